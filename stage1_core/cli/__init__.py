"""Command lines over the library, one module each; nothing in stage1_core imports this package.

    python -m stage1_core.cli.model [--id MODEL] [--prompt TEXT]     load a model, print its fingerprint and a completion
    python -m stage1_core.cli.engine [--prompt TEXT]                 the engine against plain generate, one prompt
    python -m stage1_core.cli.scoring                                prefix-broadcast critic scoring against the plain forward
    python -m stage1_core.cli.critic_eval --labels FILE [...]        measure the critic on a labelled file
"""
