"""Datasets and the missing-case streams built from them."""
