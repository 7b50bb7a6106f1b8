"""The build-time half of memfit: export, shrink, evaluate, measure and approve models."""
