"""Plain-PyTorch training pieces shared by the Ray Train loops: models from config, state I/O."""
