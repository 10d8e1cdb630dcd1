"""Stage 1 domain library, one package per area, imports pointing down only:

    infra   shared infrastructure: config, errors, atomic storage, the JSONL reader, locks, provenance,
            fault points, interrupts, code hashing, statistics, typed records (imports nothing above)
    model   the model stack: resolution and loading, guards, the HF backend and its engine, the fake
            backend, critic scoring (imports infra; its public face is `stage1_core.model` itself)
    phases  the pilot: seeds, prompts, filters, the critic, the five phases, QC and the gate, the run
            folder (imports infra, model)
    scale   scale runs: the plan and its shards, the merge, the dataset card (imports infra, model, phases)
    train   LoRA SFT and the evaluation: judge, IFEval checkers, eval data (imports everything below)
    cli     command lines over the library (`python -m stage1_core.cli.model`); nothing imports it

Never imports prefect (tests/core/test_layering.py asserts it, and the layer order above); every piece
runs without an orchestrator.
"""

__version__ = "0.1.0"
