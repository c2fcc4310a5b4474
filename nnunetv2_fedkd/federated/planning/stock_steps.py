"""Steps that use nnU-Net's Python API, run by :func:`~nnunetv2_fedkd.federated.planning.plan.plan_federation` in a
fresh interpreter (``python -m nnunetv2_fedkd.federated.planning.stock_steps STEP ...``): nnU-Net reads its path
variables when first imported.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from nnunetv2_fedkd.federated.planning.layout import FederatedPlanningError


def _stock_planner_without_example_image(planner_name: str):
    """The stock planner class ``planner_name`` with ``determine_reader_writer`` taking the reader/writer from
    dataset.json alone (the coordinator has no image to try); same class name, nothing else changed."""
    import nnunetv2
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    base = recursive_find_python_class(str(Path(nnunetv2.__path__[0]) / "experiment_planning"), planner_name,
                                       current_module="nnunetv2.experiment_planning")
    if base is None:
        raise FederatedPlanningError(f"no nnU-Net experiment planner named {planner_name!r}")

    def determine_reader_writer(self):
        if self.dataset_json.get("overwrite_image_reader_writer") in (None, "None"):
            raise FederatedPlanningError("the plans dataset's dataset.json must name overwrite_image_reader_writer")
        return determine_reader_writer_from_dataset_json(self.dataset_json, None, verbose=False)

    return type(base.__name__, (base,), {"determine_reader_writer": determine_reader_writer,
                                         "__module__": __name__})


def _worker_main(argv: Sequence[str]) -> None:
    step, *rest = argv
    if step == "plan":
        dataset, plans_name, planner_name = rest
        planner = _stock_planner_without_example_image(planner_name)(dataset, plans_name=plans_name)
        planner.plan_experiment()
    elif step == "receive":
        from nnunetv2.experiment_planning.plans_for_pretraining.move_plans_between_datasets import \
            move_plans_between_datasets

        source, plans_name, *targets = rest
        for target in targets:
            move_plans_between_datasets(source, target, plans_name, plans_name)
    else:
        raise SystemExit(f"unknown step {step!r}")


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
