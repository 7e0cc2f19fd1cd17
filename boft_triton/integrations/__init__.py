"""Integrations with the rest of the ecosystem: transformers' Trainer, TRL, and PEFT itself."""
