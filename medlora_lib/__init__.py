"""medlora: federated parameter-efficient fine-tuning of a cardiac-MRI foundation model.

The library behind the book. Each module's docstring names the chapter that explains it.
"""

__version__ = "0.1.0"
