"""Python client for adamserve, shaped like torch.optim."""
