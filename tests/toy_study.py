"""A study small enough for a test (tests/test_compare.py): plain SigLIP (40 steps, long
enough to be killed mid-run) against JEST with a reference (20 steps) on the tiny
embedded data, evaluated every 10 steps."""


def get_study(arg: str | None = None) -> dict:
    del arg
    return dict(
        title="toy",
        base="configs/smoke.py:steps=20",
        set={"batch_size": 32, "evals.batch_size": 32, "checkpoint.every_steps": 10,
             "logging.every_steps": 5},
        references={"clean": {"config": "configs/smoke.py:steps=10",
                              "set": {"batch_size": 32}}},
        variants={
            "uniform": {"method": "uniform", "steps": 40},
            "JEST": {"method": "joint", "filter": 0.5, "reference": "clean",
                     "set": {"data.train.split": "raw", "selection.num_chunks": 4}},
        },
        baseline="uniform",
        seeds=(0, 1),
        target="zero_shot/mean",
        report=("zero_shot/color", "retrieval/i2t_r1"),
        eval_every=10,
    )
