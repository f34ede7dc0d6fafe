from .linear import AFPQLinear, second_param_name

__all__ = ["AFPQLinear", "second_param_name"]
