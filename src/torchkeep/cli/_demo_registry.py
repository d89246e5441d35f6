"""The demo's last step: register the best checkpoint and promote it to "production"."""

from __future__ import annotations

import torchkeep as tk
from torchkeep.cli._demo_common import DemoRun
from torchkeep.cli._errors import fail
from torchkeep.cli._output import print_line
from torchkeep.format import is_registry
from torchkeep.storage import storage_for


def step_registry(run: DemoRun) -> None:
    """``tk.Registry``: the run's best checkpoint becomes version 1, aliased "production"."""
    folder = run.registry_dir
    if folder.exists():  # a previous demo's registry: start afresh, and delete nothing else
        if not is_registry(folder):
            fail(f"{folder} exists and is not a torchkeep registry: choose another --workdir")
        storage_for(folder).remove_tree(str(folder))
    source = f"{run.run_dir}@best" if run.run_dir.is_dir() else str(run.model_dir)
    with tk.Registry(folder) as reg:
        print_line(f"$ torchkeep registry register {folder.name} demo-mlp {source}")
        v = reg.register("demo-mlp", source, metadata={"seed": run.seed}, config=run.hparams)
        print_line(f"registered {v.name}@{v.version} ({v.fingerprint[:19]}...)")
        print_line(f"$ torchkeep registry alias {folder.name} demo-mlp production {v.version}")
        move = reg.set_alias("demo-mlp", "production", v.version)
        print_line(f"demo-mlp@production: {move.from_version or '(new)'} -> {move.to_version}")
        model = tk.load_model(f"{folder}/demo-mlp@production")
        print_line(f"tk.load_model('{folder.name}/demo-mlp@production'): {type(model).__name__}")
        run.registered = reg.resolve("demo-mlp", "production")
