"""The parts train.py, test.py and main.py compose a run from: the configured network (network.py),
sliding-window inference, the training step and its optimizer, schedule and loss (step.py), stop signals
and crash-saving (guard.py), what training reports (monitor.py), and FLOP counting (flops.py)."""
