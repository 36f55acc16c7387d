"""`python tests/cli_with_test_net.py COMMAND ...`: main.py's command line with one more registered network,
"fault-test-net", small enough that the fault tests' subprocesses train in a second (the data path, loop,
checkpoints and CLI stay the real ones)."""
import sys
from pathlib import Path

import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import main  # noqa: E402
from models import list_models, register_model  # noqa: E402

NAME = "fault-test-net"


class FaultTestNet(nn.Module):
    """Convolution, BatchNorm and dropout: a resume must restore the weights, the BatchNorm statistics and
    the torch random stream that draws the dropout masks."""

    def __init__(self, in_channels=1, out_channels=9, width=8):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, width, 3, padding=1)
        self.norm = nn.BatchNorm3d(width)
        self.drop = nn.Dropout3d(0.2)
        self.head = nn.Conv3d(width, out_channels, 1)

    def forward(self, x):
        return self.head(self.drop(F.relu(self.norm(self.conv(x)))))


if NAME not in list_models():
    register_model(NAME)(FaultTestNet)

if __name__ == "__main__":
    main.cli(sys.argv[1:], default_command="train")
