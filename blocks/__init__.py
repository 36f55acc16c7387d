"""What EM-Net and the baselines are both built from: the selective scan and its backends, the causal
convolution, Mamba, token/grid reshapes and the training-window check. Imports nothing of this project."""
