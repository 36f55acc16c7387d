"""The baselines of the paper's comparison, one module per family; each module offers plain builder
functions, which models/baselines.py registers by name. Imports blocks/, never models/."""
