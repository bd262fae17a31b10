"""Losses as plain functions of arrays (no module state): reconstruction, contrastive, adversarial, DiffAug."""
