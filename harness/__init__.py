"""Everything around the methods of sdpo_cl.py, one concern per module:

    lab.py          the built-in labs: tokenizer, model, the shipped bases, their recipes, settings
    lab_families.py the labs' task families: generators, solutions and habits, rewards
    data.py         the paper's data: the official layout, the official rewards by kind, GSM8K
    sandbox.py      running model-written code for the code reward
    models.py       loading models (hub id, folder, GGUF), offline checks, prompts that do not fit
    runs.py         run folders: atomic writes, per-stage checkpoints with manifests, the lock
    verl.py         the verl bridge: the same settings as commands for the official code
    walkthrough.py  `python sdpo_cl.py`: one rollout batch of both methods, token by token
"""
