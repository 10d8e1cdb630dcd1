"""Thin Prefect tasks: take references, call stage1_core, return small manifests."""
