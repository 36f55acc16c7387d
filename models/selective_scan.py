"""The selective scan's public import path, kept for scripts that use it; it lives in blocks.selective_scan,
where both EM-Net and the baselines import it."""
from blocks.selective_scan import (  # noqa: F401
    BACKENDS,
    ENV_VAR,
    available_scan_backends,
    get_scan_backend,
    scan_backend_for,
    selective_scan,
    set_scan_backend,
)
