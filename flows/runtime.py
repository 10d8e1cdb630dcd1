"""What a flow needs to know about where it runs: under a deployment or locally, its output
folder under a deployment, its tags, and the approval form of a suspended run."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from prefect import flow
from prefect.input import RunInput

from stage1_core.infra import interrupts, options
from stage1_core.phases import run
from stage1_core.infra.errors import InputError, WriteError
from stage1_core.infra.locks import LockedError

OUTPUT_ROOT_ENV = "STAGE1_OUTPUT_ROOT"
APPROVAL_TIMEOUT_DEPLOYMENT = "stage1/approval-timeout"
SCALE_DEPLOYMENT = "stage1/scale"


def deployment_name() -> str | None:
    """The deployment this flow run belongs to, or None for a local run."""
    from prefect.runtime import deployment

    return deployment.name if deployment.id else None


RUN_KEY_PATTERN = options.RUN_KEY_PATTERN  # one declaration (stage1_core.infra.options)


def options_flow(body: Callable[..., dict[str, Any]], declaration: type, summary: str, *, name: str,
                 run_name: Callable[[], str]) -> Any:
    """The Prefect flow `stage1` whose parameters are an options declaration (stage1_core.infra.options):
    `body(**params)` gets them; its signature, Prefect's parameter schema, the deployment form and
    the validation at the flow's edge all come from `declaration`, and its docstring's Args from the
    options' meanings."""
    body.__signature__ = options.flow_signature(declaration)  # type: ignore[attr-defined]
    body.__doc__ = options.flow_docstring(summary, declaration)
    body.__name__ = body.__qualname__ = name
    return flow(name="stage1", flow_run_name=run_name, log_prints=True)(body)


def run_output(explicit: str | None, local_default: str | None, run_key: str | None = None) -> str | None:
    """The output folder: the explicit one, else under a deployment
    `${STAGE1_OUTPUT_ROOT}/{deployment}/{run_key}` when a run key is given (a rerun with the same key
    resumes that folder, as rerunning a CLI command does) or `.../{flow_run_name}` (a fresh folder per
    run); the root defaults to ./artifacts of the worker's working directory. Locally: the default.
    """
    if explicit:
        return explicit
    name = deployment_name()
    if name is None:
        return local_default
    from prefect.runtime import flow_run

    root = os.environ.get(OUTPUT_ROOT_ENV) or str(Path.cwd() / "artifacts")
    return str(Path(root) / name / (run_key or flow_run.name))


def add_tags(*tags: str) -> None:
    """Add tags to the current flow run (kept: the tags it already has)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if not flow_run.id:
        return
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(flow_run.id).tags or []
        client.update_flow_run(flow_run.id, tags=sorted({*current, *tags}))


class _HideWriteErrorTraceback(logging.Filter):
    """On the console only: run_cli prints a WriteError's block itself, and Prefect's traceback of the
    failed flow run would bury it. Prefect's API handler (the run's logs in the UI) sits on the
    `prefect.flow_runs` logger and still gets the full record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], WriteError))


class Plan(Protocol):
    """What run_cli needs of a flow's plan (pilot, scale, SFT, eval): the output folder it writes."""

    @property
    def output(self) -> str: ...


P = TypeVar("P", bound=Plan)


def run_cli(prepare: Callable[[], P], *, dry_run: bool, dry_text: Callable[[P], str],
            start: Callable[[P], dict[str, Any]], load: Callable[[P], Any] | None = None) -> dict[str, Any] | int:
    """The path every CLI shares: validate (bad input: exit 2, nothing written), `--dry-run` (print
    the plan, exit 0), load and check the model (`load`, e.g. `run.load_model`: a model that fails its
    guards is bad input, exit 2, and the output folder is left as it was), then run the flow, turning
    a locked folder into 5, Ctrl-C into 130, bad input found later into 2 and a file the operating
    system refused to write (disk full, permissions: `WriteError`) into 1 with its error block.

    Returns:
        The flow's result, or the exit code when it did not get one.
    """
    try:
        plan = prepare()
    except InputError as e:
        print(e.render(), file=sys.stderr)
        print("nothing was written.", file=sys.stderr)
        return 2
    if dry_run:
        print(dry_text(plan))
        return 0
    interrupts.install()  # Ctrl-C is remembered, so a swallowed one still stops the run (exit 130)
    consoles = [h for h in logging.getLogger().handlers + logging.getLogger("prefect").handlers
                if isinstance(h, logging.StreamHandler)]
    quiet = _HideWriteErrorTraceback()
    for h in consoles:
        h.addFilter(quiet)
    try:
        if load is not None:
            try:
                load(plan)  # cached per process: the flow's phases reuse this model
            except InputError as e:
                print(e.render(), file=sys.stderr)
                print(f"nothing was written: the output folder {plan.output} is as it was.", file=sys.stderr)
                return 2
        return start(plan)
    except LockedError as e:
        print(e.render(), file=sys.stderr)
        return 5
    except KeyboardInterrupt:
        print(run.interrupted_text(plan.output), file=sys.stderr)
        interrupts.forget_caught()  # or a caught one may still end `python -m` by SIGINT, not 130
        return 130
    except InputError as e:
        print(e.render(), file=sys.stderr)
        return 2
    except WriteError as e:
        print(e.render(), file=sys.stderr)
        return 1
    finally:
        for h in consoles:
            h.removeFilter(quiet)


class ScaleApproval(RunInput):
    """The resume form of a pilot waiting for approval to scale."""

    decision: Literal["approve", "reject"]
    note: str = ""
