"""Coordinator side: Flower ServerApp and strategy, model registry, audit log, records, API."""
