"""TensorBoard event files beside the JSON records: distill's training curves and eval's table.

`tensorboard --logdir RUN` then shows a run's losses, learning rate, gradient norm, throughput and
the data loader's share of step time, and every evaluation of its checkpoint. log.jsonl, results.json
and the PNG plots stay the records; the events are a view of the same numbers.
"""



# log.jsonl keys that are not loss terms, and their TensorBoard tags; loss terms go under loss/, and the
# grouped figures (share/<term>, scale/<objective>, health/<head>/...) keep their own names as tags
TRAIN_TAGS = {"loss": "loss/total", "lr": "train/lr", "grad_norm": "train/grad_norm", "epoch": "train/epoch",
              "clips_per_s": "perf/clips_per_s", "loader_share": "perf/loader_share"}


def event_writer(log_dir, purge_step=None):
    from torch.utils.tensorboard import SummaryWriter  # tensorboard is a requirement; imported when used
    return SummaryWriter(log_dir, purge_step=purge_step)


class TrainEvents:
    """distill's scalars, written on rank 0 at each log.jsonl record.

    A resumed run starts at the checkpoint's step: `purge_step` tells TensorBoard to drop what an
    earlier (killed) process logged after it, as drop_log_after does for log.jsonl.
    """

    def __init__(self, run_dir, first_step=0):
        self.writer = event_writer(run_dir, purge_step=first_step + 1)

    def add(self, rec, loss_names):
        """rec: a log.jsonl record (step, loss, lr, ...); loss_names: its loss terms."""
        step = rec["step"]
        for key, value in rec.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            tag = f"loss/{key}" if key in loss_names else key if "/" in key else TRAIN_TAGS.get(key, f"train/{key}")
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a killed run keeps what it logged

    def close(self):
        self.writer.close()
