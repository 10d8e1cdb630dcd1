"""Stage 1 domain library: model loading and guards, prompts, generation, the A/B critic, QC, provenance.

Never imports prefect (tests/core/test_layering.py asserts it); every piece runs without an orchestrator.
"""

__version__ = "0.1.0"
