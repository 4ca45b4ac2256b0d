"""A post-hoc family defined outside rayblora is fitted by `rayblora fit` through the base interface alone: its
own module (here, this test) and one registry row, nothing else."""

import torch

from conftest import tiny_overrides
from rayblora.artifact import load_posterior, save_posterior
from rayblora.cli import main
from rayblora.data.batches import eval_batches
from rayblora.posteriors.base import Posterior
from rayblora.registry import _CLASSES, _TABLE, get_posterior_class, post_hoc_methods, register


class AnswerLoss:
    """A toy curvature: the summed answer NLL and row count of a member over its training rows."""

    def __init__(self):
        self.n_data, self.nll = 0, torch.zeros((), dtype=torch.float64)

    def sum_(self, all_reduce, rank, world):
        totals = torch.stack([torch.tensor(float(self.n_data), dtype=torch.float64), self.nll])
        all_reduce(totals)
        self.n_data, self.nll = int(totals[0]), totals[1]

    def state_tensors(self):
        return {"n_data": torch.tensor([self.n_data]), "nll": self.nll.reshape(1)}

    def load_state_tensors(self, tensors):
        self.n_data, self.nll = int(tensors["n_data"][0]), tensors["nll"][0]


class TemperedByLoss(Posterior):
    """The fitted members' average, each member's logits divided by 1 + its mean training NLL."""

    method = "test_tempered_by_loss"
    post_hoc = "curvature"
    needs_data = True

    def __init__(self, scorer, members, member_info, temperatures: dict[int, float]):
        super().__init__(scorer, members, member_info)
        self.temperatures = dict(temperatures)

    @classmethod
    def curvature_pass(cls, scorer, member, train, config, rank=0, world=1):
        loss = AnswerLoss()
        with scorer.restoring_adapter(), torch.no_grad():
            batches = eval_batches(train, scorer.tokenizer, config.train.batch_size, scorer.max_length)
            for i, batch in enumerate(batches):
                if i % world == rank:
                    logits = scorer.logits_for_states(batch, [member])[0]
                    loss.nll += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").double()
                    loss.n_data += len(batch["labels"])
        return loss

    @classmethod
    def empty_curvature(cls, scorer, config):
        return AnswerLoss()

    @classmethod
    def from_curvatures(cls, scorer, members, member_info, curvatures, config, validation=None, fit_meta=None):
        return cls(scorer, members, member_info, {i: 1.0 + float(c.nll) / c.n_data for i, c in curvatures.items()})

    @classmethod
    def from_artifact(cls, scorer, members, member_info, tensors, extra):
        return cls(scorer, members, member_info, {int(i): t for i, t in extra["temperatures"].items()})

    def artifact_extra(self):
        return {"temperatures": {str(i): t for i, t in self.temperatures.items()}}

    def fit_summary(self) -> str:
        return f"temperatures {self.temperatures}"

    def sample_logits(self, batch):
        fitted = sorted(self.temperatures)
        logits = self.scorer.logits_for_states(batch, [self.members[i] for i in fitted])
        return logits / torch.tensor([self.temperatures[i] for i in fitted])[:, None, None]


def test_a_curvature_family_from_outside_is_fitted_by_the_fit_command(trained_members, tiny_session_config,
                                                                      sentiment_files, tmp_path, capsys):
    scorer, states, infos = trained_members
    parent = save_posterior(get_posterior_class("ensemble").build(scorer, states, infos), tmp_path / "parent",
                            model_config=tiny_session_config.model, adapter_config=tiny_session_config.adapter)
    register(TemperedByLoss)
    try:
        assert "test_tempered_by_loss" in post_hoc_methods()
        overrides = tiny_overrides(sentiment_files, tmp_path / "run")
        assert main(["fit", "--posterior", str(parent), "--method", "test_tempered_by_loss", *overrides]) == 0
        assert "temperatures {0:" in capsys.readouterr().out
        fitted = load_posterior(tmp_path / "run" / "posterior-test_tempered_by_loss", scorer=scorer)
        assert isinstance(fitted, TemperedByLoss) and sorted(fitted.temperatures) == [0, 1]
        assert all(t > 1.0 for t in fitted.temperatures.values())
        assert fitted.predict(["a fine film\nSentiment:"]).probs.shape == (1, 2)
    finally:
        _TABLE.pop("test_tempered_by_loss"), _CLASSES.pop("test_tempered_by_loss")

