"""state_dict interchange with torch.optim, name matching, hooks, add_param_group."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import adamserve_client as ac
from tests.client.conftest import Live

ATOL = 1e-6


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))


def clone(m: torch.nn.Module) -> torch.nn.Module:
    twin = model()
    twin.load_state_dict(m.state_dict())
    return twin


def train(m: torch.nn.Module, opt: Any, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()


def assert_same(a: torch.nn.Module, b: torch.nn.Module, atol: float = ATOL) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=0, atol=atol,
                                   err_msg=name)


def assert_state_close(sd: dict[str, Any], ref: dict[str, Any]) -> None:
    assert sd["state"].keys() == ref["state"].keys()
    for k, entry in ref["state"].items():
        assert list(sd["state"][k]) == list(entry), k
        for slot, value in entry.items():
            got = sd["state"][k][slot]
            assert isinstance(got, torch.Tensor) and got.dtype == value.dtype, (k, slot)
            # state may be ill-conditioned (centered RMSprop divides by a difference): relative
            np.testing.assert_allclose(got.numpy(), value.numpy(), rtol=1e-5, atol=ATOL)
    assert [{k: v for k, v in g.items()} for g in sd["param_groups"]] == ref["param_groups"]


def test_remote_state_dict_loads_into_torch_and_training_continues(url: str, sid: str) -> None:
    reference = model()
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    remote_model = clone(reference)
    remote = ac.AdamW(remote_model.parameters(), lr=1e-2, weight_decay=0.1, server=url,
                      session=sid)
    try:
        train(reference, ref_opt, 8, seed=1)
        train(remote_model, remote, 8, seed=1)
        sd = remote.state_dict()
        assert_state_close(sd, ref_opt.state_dict())
        # hand the run over to torch.optim
        local_model = clone(remote_model)
        local = torch.optim.AdamW(local_model.parameters(), lr=1e-2, weight_decay=0.1)
        local.load_state_dict(sd)
        train(reference, ref_opt, 8, seed=2)
        train(local_model, local, 8, seed=2)
        assert_same(local_model, reference)
    finally:
        remote.close(delete=True)


def test_torch_state_dict_loads_into_remote_and_training_continues(url: str, sid: str) -> None:
    reference = model()
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, amsgrad=True)
    train(reference, ref_opt, 8, seed=3)
    remote_model = clone(reference)
    remote = ac.AdamW(remote_model.parameters(), lr=0.5, amsgrad=True, server=url, session=sid)
    try:
        remote.load_state_dict(ref_opt.state_dict())
        assert remote.param_groups[0]["lr"] == 1e-2  # hyperparameters came along
        assert remote.describe().step == 8
        train(reference, ref_opt, 8, seed=4)
        train(remote_model, remote, 8, seed=4)
        assert_same(remote_model, reference)
        assert_state_close(remote.state_dict(), ref_opt.state_dict())
    finally:
        remote.close(delete=True)


@pytest.mark.parametrize("torch_cls,remote_cls,options", [
    (torch.optim.NAdam, ac.NAdam, {}),
    (torch.optim.Adagrad, ac.Adagrad, {"initial_accumulator_value": 0.1}),
    (torch.optim.RMSprop, ac.RMSprop, {"momentum": 0.5, "centered": True}),
    (torch.optim.Adamax, ac.Adamax, {}),
], ids=["nadam", "adagrad", "rmsprop", "adamax"])
def test_round_trip_other_algorithms(url: str, sid: str, torch_cls: Any, remote_cls: Any,
                                     options: dict[str, Any]) -> None:
    """Each algorithm's slots (mu_product, sum, momentum_buffer, exp_inf...) go both ways."""
    reference = model()
    ref_opt = torch_cls(reference.parameters(), lr=1e-2, **options)
    remote_model = clone(reference)
    remote = remote_cls(remote_model.parameters(), lr=1e-2, server=url, session=sid, **options)
    try:
        train(reference, ref_opt, 4, seed=5)
        train(remote_model, remote, 4, seed=5)
        assert_state_close(remote.state_dict(), ref_opt.state_dict())
        remote.load_state_dict(ref_opt.state_dict())
        back = torch_cls(clone(remote_model).parameters(), lr=1e-2, **options)
        back.load_state_dict(remote.state_dict())
        train(reference, ref_opt, 4, seed=6)
        train(remote_model, remote, 4, seed=6)
        assert_same(remote_model, reference)
    finally:
        remote.close(delete=True)


def test_named_parameters_match_by_name(url: str, sid: str) -> None:
    """With names on both sides, a state_dict loads whatever the parameter order."""
    reference = model()
    ref_opt = torch.optim.Adam(reference.named_parameters(), lr=1e-2)
    train(reference, ref_opt, 5, seed=7)
    sd = ref_opt.state_dict()
    assert sd["param_groups"][0]["param_names"][0] == "0.weight"
    remote_model = clone(reference)
    reordered = list(reversed(list(remote_model.named_parameters())))
    remote = ac.Adam(reordered, lr=1e-2, server=url, session=sid)
    try:
        assert [t.name for t in remote.describe().tensors] == [n for n, _ in reordered]
        remote.load_state_dict(sd)
        out = remote.state_dict()
        assert out["param_groups"][0]["param_names"] == [n for n, _ in reordered]
        # index 0 is now "2.bias": its state is torch's state for "2.bias" (index 3)
        np.testing.assert_allclose(out["state"][0]["exp_avg"].numpy(),
                                   sd["state"][3]["exp_avg"].numpy(), atol=ATOL)
        train(reference, ref_opt, 5, seed=8)
        train(remote_model, remote, 5, seed=8)
        assert_same(remote_model, reference)
    finally:
        remote.close(delete=True)


def test_mismatch_raises_with_names_and_shapes(url: str, sid: str) -> None:
    remote_model = model()
    remote = ac.AdamW(remote_model.parameters(), server=url, session=sid)
    try:
        small = torch.nn.Linear(5, 7)
        other = torch.optim.AdamW(small.parameters())
        small(torch.randn(2, 5)).sum().backward()
        other.step()
        with pytest.raises(ValueError, match=r"has 2 parameters; this optimizer's has 4: "
                                             r"param\.0 \[7, 5\], param\.1 \[7\]"):
            remote.load_state_dict(other.state_dict())
        # right count, wrong shape
        wrong = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(),
                                    torch.nn.Linear(7, 4))
        wrong_opt = torch.optim.AdamW(wrong.parameters())
        wrong(torch.randn(2, 5)).sum().backward()
        wrong_opt.step()
        with pytest.raises(ValueError, match=r"state of 'param\.2': exp_avg has shape \[4, 7\], "
                                             r"the parameter has shape \[3, 7\]"):
            remote.load_state_dict(wrong_opt.state_dict())
        with pytest.raises(ValueError, match="2 parameter groups; this optimizer has 1"):
            remote.load_state_dict({"state": {}, "param_groups": [{"params": []}] * 2})
        assert remote.describe().step == 0  # nothing reached the server
    finally:
        remote.close(delete=True)


def test_named_mismatch_names_the_parameters(url: str, sid: str) -> None:
    remote = ac.Adam(model().named_parameters(), server=url, session=sid)
    try:
        other = torch.optim.Adam(torch.nn.Linear(5, 7).named_parameters())
        sd = other.state_dict()
        sd["param_groups"][0]["param_names"] = ["0.weight", "extra"]
        with pytest.raises(ValueError, match=r"missing \['0.bias', '2.bias', '2.weight'\]; "
                                             r"unexpected \['extra'\]"):
            remote.load_state_dict(sd)
    finally:
        remote.close(delete=True)


def test_hooks_fire(url: str, sid: str) -> None:
    m = model()
    opt = ac.Adam(m.parameters(), server=url, session=sid)
    calls: list[str] = []
    try:
        h1 = opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
        opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
        opt.register_state_dict_pre_hook(lambda o: calls.append("sd-pre"))

        def sd_post(o: Any, sd: dict[str, Any]) -> dict[str, Any]:
            calls.append("sd-post")
            return {**sd, "extra": 1}

        opt.register_state_dict_post_hook(sd_post)
        opt.register_load_state_dict_pre_hook(
            lambda o, sd: {k: v for k, v in sd.items() if k != "extra"})
        opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
        train(m, opt, 1, seed=0)
        assert calls == ["pre", "post"]
        h1.remove()
        train(m, opt, 1, seed=0)
        assert calls == ["pre", "post", "post"]
        sd = opt.state_dict()
        assert sd["extra"] == 1 and calls[-2:] == ["sd-pre", "sd-post"]
        opt.load_state_dict(sd)
        assert calls[-1] == "load-post"
        # a global torch hook fires too
        seen = []
        handle = register_optimizer_step_post_hook(
            lambda o, a, k: seen.append(type(o).__name__))
        try:
            train(m, opt, 1, seed=0)
        finally:
            handle.remove()
        assert seen == ["Adam"]
    finally:
        opt.close(delete=True)


def test_add_param_group_grows_the_session(url: str, sid: str) -> None:
    """Adding a group mid-training keeps the old tensors' weights and state."""
    reference = model()
    frozen, head = list(reference[0].parameters()), list(reference[2].parameters())
    ref_opt = torch.optim.Adam(head, lr=1e-2)
    remote_model = clone(reference)
    remote = ac.Adam(list(remote_model[2].parameters()), lr=1e-2, server=url, session=sid,
                     wire_dtype="float32")
    try:
        train(reference, ref_opt, 4, seed=9)
        train(remote_model, remote, 4, seed=9)
        ref_opt.add_param_group({"params": frozen, "lr": 3e-3})
        remote.add_param_group({"params": list(remote_model[0].parameters()), "lr": 3e-3})
        info = remote.describe()
        assert [t.group for t in info.tensors] == [0, 0, 1, 1] and info.step == 4
        assert info.groups[1]["lr"] == 3e-3
        train(reference, ref_opt, 4, seed=10)
        train(remote_model, remote, 4, seed=10)
        assert_same(remote_model, reference)
        assert_state_close(remote.state_dict(), ref_opt.state_dict())
        with pytest.raises(ValueError, match="more than one parameter group"):
            remote.add_param_group({"params": list(remote_model[0].parameters())})
        assert len(remote.param_groups) == 2 and len(remote.describe().tensors) == 4
    finally:
        remote.close(delete=True)


def test_add_param_group_keeps_the_session_and_its_checkpoint(url: str, sid: str,
                                                              live: Live) -> None:
    """The session grows in place: same session, its checkpoint kept, the step count too."""
    reference = model()
    frozen, head = list(reference[0].parameters()), list(reference[2].parameters())
    ref_opt = torch.optim.AdamW(head, lr=1e-2)
    remote_model = clone(reference)
    remote = ac.AdamW(list(remote_model[2].parameters()), lr=1e-2, server=url, session=sid)
    try:
        train(reference, ref_opt, 3, seed=11)
        train(remote_model, remote, 3, seed=11)
        ck = remote.checkpoint()
        assert ck.step == 3 and (live.data_dir / ck.path).is_dir()  # relative to it
        ref_opt.add_param_group({"params": frozen, "lr": 1e-3, "betas": (0.8, 0.9)})
        remote.add_param_group({"params": list(remote_model[0].parameters()), "lr": 1e-3,
                                "betas": (0.8, 0.9)})
        info = remote.describe()
        assert info.checkpointed_step == 3 and info.step == 3
        assert (live.data_dir / ck.path).is_dir() and (live.data_dir / "sessions" / sid).is_dir()
        assert info.groups[1]["betas"] == (0.8, 0.9) and len(info.tensors) == 4
        train(reference, ref_opt, 3, seed=12)
        train(remote_model, remote, 3, seed=12)
        assert_same(remote_model, reference)
        assert_state_close(remote.state_dict(), ref_opt.state_dict())
    finally:
        remote.close(delete=True)


def test_refused_add_param_group_changes_nothing_and_training_continues(url: str,
                                                                        sid: str) -> None:
    reference = model()
    ref_opt = torch.optim.Adam(reference.named_parameters(), lr=1e-2)
    remote_model = clone(reference)
    remote = ac.Adam(remote_model.named_parameters(), lr=1e-2, server=url, session=sid)
    extra = torch.nn.Parameter(torch.ones(3))
    try:
        train(reference, ref_opt, 2, seed=13)
        train(remote_model, remote, 2, seed=13)
        before = remote.describe()
        # the server refuses the hyperparameter: nothing changed on either side
        with pytest.raises(ac.InvalidArgument, match=r"lr: expected a value >= 0"):
            remote.add_param_group({"params": [("extra", extra)], "lr": -1.0})
        # a name the session has already: refused before anything is sent
        with pytest.raises(ValueError, match=r"'0\.weight' appears twice"):
            remote.add_param_group({"params": [("0.weight", extra)]})
        assert len(remote.param_groups) == 1 and remote.describe() == before
        train(reference, ref_opt, 2, seed=14)
        train(remote_model, remote, 2, seed=14)
        assert_same(remote_model, reference)
        assert_state_close(remote.state_dict(), ref_opt.state_dict())
        # and the same group, corrected, goes in
        remote.add_param_group({"params": [("extra", extra)], "lr": 0.5})
        assert [t.name for t in remote.describe().tensors][-1] == "extra"
    finally:
        remote.close(delete=True)


def test_add_param_group_whose_answer_is_lost_checks_the_session(live: Live, sid: str) -> None:
    """A timeout after the server grew the session is a success; before it, a failure."""
    from adamserve_client.transports.grpc import GrpcTransport

    class Flaky(GrpcTransport):
        apply = True

        def add_tensors(self, session_id: str, tensors: Any, group: Any = None,
                        initial: Any = ()) -> Any:
            if self.apply:
                super().add_tensors(session_id, tensors, group, initial)
            raise ac.DeadlineExceeded("no answer within the timeout")

    with Flaky(live.urls["grpc"]) as transport:
        opt = ac.Adam([torch.zeros(2)], server=transport, session=sid)
        try:
            opt.add_param_group({"params": [torch.zeros(3)], "lr": 0.1})
            assert len(opt.param_groups) == 2 and len(opt.describe().tensors) == 2
            transport.apply = False
            with pytest.raises(ac.DeadlineExceeded):
                opt.add_param_group({"params": [torch.zeros(4)]})
            assert len(opt.param_groups) == 2 and len(opt.describe().tensors) == 2
            opt.zero_grad()
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad = torch.ones_like(p)
            opt.step()
            assert opt.describe().step == 1
        finally:
            opt.close(delete=True)
