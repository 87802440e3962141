"""Orchestration: wires the science into Ray Tune (training), Ray Data (selection) and MLflow.

Nothing below overinterp/pipeline is imported by the science modules.
"""
