"""The deployed half of memfit: loads approved artifacts and serves them within the memory budget.

Nothing in this package may import torch, transformers, optimum or scikit-learn.
"""
