"""Evaluation helpers for benches and tests: labelled clips of ../shared/data, built
conversations, DER and EER. Never imported by the service."""
