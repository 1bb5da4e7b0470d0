"""Run by test_multiprocess.py under `accelerate launch`: the teacher CLI, plus each rank's final weights saved."""

import sys

import torch

from mcd_hf.training import teacher

_export = teacher.MDLMTrainer.export


def _export_and_dump_weights(self, output_dir):
    weights = {name: value.detach().cpu().clone() for name, value in self.unwrapped_model.state_dict().items()}
    torch.save({"weights": weights, "num_processes": self.accelerator.num_processes},
               f"{output_dir}/rank{self.accelerator.process_index}.pt")
    _export(self, output_dir)


teacher.MDLMTrainer.export = _export_and_dump_weights

if __name__ == "__main__":
    sys.exit(teacher.main(sys.argv[1:]))
