"""Everything around the methods of sdpo_cl.py, one concern per module:

    lab.py          the built-in labs: tokenizer, model, the shipped bases, their recipes, settings
    lab_families.py the labs' task families: generators, solutions and habits, rewards, relations
    data.py         the paper's data: the official layout, the official rewards by kind, the hub
    code_reward.py  the official code reward: a row's tests checked, outputs compared, feedback
    sandbox.py      running model-written code isolated by the operating system
    models.py       loading hub models (id, folder, GGUF), offline checks, prompts that do not fit
    loading.py      tasks and models by name (a lab family, gsm8k, a folder; a lab, a hub id)
    measures.py     what a run measures besides accuracy: signal, drift, distances, artifacts
    lora.py         LoRA adapters through peft, and the teacher as a second adapter
    sft.py          supervised fine-tuning on the gold answers, the reference point for forgetting
    files.py        atomic writes and strict JSON (the standard library alone: the reports use it)
    runs.py         run folders: per-stage and mid-stage checkpoints with manifests, the lock
    verl.py         the verl bridge: the same settings as commands for the official code
    walkthrough.py  `python sdpo_cl.py`: one rollout batch of both methods, token by token
"""
