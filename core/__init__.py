"""What every room uses: the user-error type, atomic file writes, the run folder, checkpoints and process
groups. Imports nothing of the project outside core/."""
