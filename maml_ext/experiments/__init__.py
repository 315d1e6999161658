"""Ready-made experiments (the paper's presets), each a function that trains, evaluates and writes its results."""
