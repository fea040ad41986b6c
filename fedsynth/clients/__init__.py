"""The institution's node: a Flower ClientApp that trains on local rows under DP-SGD."""
