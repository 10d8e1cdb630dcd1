"""The pilot's phases and its run: `seeds`, `prompts` (prompt/parse pairs), `filters`, `critic` and
`critic_eval`, `pipeline` (the five phases as functions over files), `qc` (metrics and the gate),
`reports`, `run` (the plan and the output folder) and `approval`. Imports infra and the model facade."""
