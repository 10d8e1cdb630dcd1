"""Score a few critic prompts with the embedded model through the prefix-broadcast path and the plain
forward, and print the largest difference (a by-hand check of stage1_core.model.scoring).

    PYTHONPATH=. python -m stage1_core.cli.scoring
"""

from __future__ import annotations


def main() -> int:
    """Score a few critic prompts with the embedded model, prefix path vs plain path; print the max difference."""
    from stage1_core.infra.config import ModelConfig, load_pilot_config
    from stage1_core.model import load_backend
    from stage1_core.phases.prompts import build_critic_prompt

    backend = load_backend(ModelConfig())
    critic = load_pilot_config().critic
    items = [("Name a fruit.", "Apple."), ("Explain why the sky is blue.", "Air scatters blue light the most."),
             ("Say hi.", "Hello!")]
    prompts = [build_critic_prompt(critic.pair_rubric, swap=s, instruction=i, response=r, labels=tuple(critic.labels))
               for i, r in items for s in (False, True)]
    cands = ["A", " A", "B", " B"]
    fast = backend.next_token_logprobs(prompts, cands)  # type: ignore[attr-defined]
    plain = backend._next_token_logprobs_plain(prompts, cands)  # type: ignore[attr-defined]
    print(max(abs(a[c] - b[c]) for a, b in zip(fast, plain) for c in cands))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
