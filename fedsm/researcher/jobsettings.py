"""What a researcher may change in a running Job, each change recorded before it applies: the
global parameters between rounds (the seed's ``update_parameters``), the nodes, the training
arguments and the round limit (``SettingsChanged``), all taking effect from the next round.

Kept apart from :mod:`fedsm.researcher.job`, which drives rounds: here every method checks
its change against the lifecycle, records it, and does nothing else (a file another party
may see is uploaded only when a request first names it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsm.core import lifecycle
from fedsm.core.events import Event, ParamsUploaded, SettingsChanged
from fedsm.digests import sha256_file
from fedsm.researcher.errors import JobError, RefusedByLifecycle
from fedsm.researcher.jobviews import JobViews
from fedsm.training.args import TrainingArgs
from fedsm.training.params import ParamsFileError, load_params, save_params

if TYPE_CHECKING:
    from fedsm.researcher.driver import RoundDriver

__all__ = ["JobSettings"]


class JobSettings(JobViews):
    """The changing half of :class:`~fedsm.researcher.job.Job` (between rounds), and the one
    way anything is recorded: checked against the lifecycle, appended, then adopted."""

    _clock: Callable[[], float]
    _driver: RoundDriver
    _progress: Any

    # ------------------------------------------------------------------ recording

    def _check_event(self, event: Event) -> None:
        """Raise :class:`RefusedByLifecycle` if the lifecycle refuses ``event`` now."""
        try:
            lifecycle.apply(self._state, event)
        except lifecycle.IllegalTransition as exc:
            raise RefusedByLifecycle(exc.state, exc.event, exc.reason) from None

    def _check_allowed(self, event_type: str) -> None:
        """Raise :class:`RefusedByLifecycle` unless the table allows ``event_type`` now."""
        if event_type not in lifecycle.allowed_events(self._state.status):
            allowed = ", ".join(lifecycle.allowed_events(self._state.status)) or "none"
            raise RefusedByLifecycle(self._state.status, event_type, f"allowed events: {allowed}")

    def _record(self, event: Event) -> None:
        """Check ``event`` against the lifecycle, append it, and only then adopt the new state."""
        new_state = lifecycle.apply(self._state, event)
        self._log.append(event, ts=self._clock())
        self._state = new_state

    def _record_all(self, events: Iterable[Event]) -> None:
        """Check ``events`` in order against the lifecycle, then append them as one write."""
        events = list(events)
        if not events:
            return
        state = self._state
        for event in events:
            state = lifecycle.apply(state, event)
        if len(events) == 1:
            self._log.append(events[0], ts=self._clock())
        else:
            self._log.append_all(events, ts=self._clock())
        self._state = state

    # ------------------------------------------------------------------ parameters

    def update_parameters(
        self,
        params: Mapping[str, Any] | None = None,
        filename: str | Path | None = None,
        is_model_params: bool = True,
        variable_name: str = "aggregated_params",
    ) -> tuple[str, str]:
        """Save ``params`` (or take the safetensors file ``filename``, which wins when it
        exists, as in the seed) as the job's global parameters for the next round; return
        ``(local file, URL)`` as the seed does.

        Allowed before the first round and between any two rounds. The parameters are
        checked against the plan's model (names, shapes, dtypes) before anything is kept or
        recorded, then recorded (``ParamsUploaded``) and uploaded when the next request
        names them. With ``is_model_params=False`` the tensors are only kept as a file for
        the nodes (an aggregator argument, say), uploaded now, and the job is unchanged.
        """
        if filename is not None and Path(filename).is_file():
            source: Path | None = Path(filename)
        elif params:
            source = None
        else:
            raise JobError(
                "update_parameters needs params (tensors) or the filename of a parameters file"
            )
        if is_model_params:
            self._check_allowed("ParamsUploaded")
        root = self._files.root
        tmp = root / "params" / f"{variable_name}.tmp"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            if is_model_params:
                like = load_params(self._driver.local_params(self.params_sha256))
                tensors = load_params(source, like=like) if source else dict(params or {})
                sha = save_params(tmp, tensors)
                load_params(tmp, like=like)  # names, shapes and dtypes of the plan's model
            elif source is not None:
                tmp.write_bytes(source.read_bytes())
                sha = sha256_file(tmp)
            else:
                sha = save_params(tmp, dict(params or {}))
        except (ParamsFileError, TypeError, ValueError) as exc:
            tmp.unlink(missing_ok=True)
            raise JobError(f"these are not parameters of the job's model: {exc}") from exc
        if not is_model_params:
            path = self._files.store(tmp, sha, kind="aggregator")
            up = self._repo.upload_file(path)
            return str(path), up["file"]
        path = self._files.store(tmp, sha)
        self._record(ParamsUploaded(round=self._state.round, sha256=sha))
        return str(path), self._repo.url_for(sha)

    def upload_aggregator_args(
        self,
        args_thr_msg: dict[str, dict[str, Any]],
        args_thr_files: Mapping[str, Mapping[str, Any]],
    ) -> dict[str, dict[str, Any]]:
        """The seed's ``upload_aggregator_args``: keep and upload each file argument (tensors,
        or a file's ``pathlib.Path``) and name it in ``args_thr_msg[node][name]`` as
        ``{"arg_name", "filename", "url", "sha256"}``; return ``args_thr_msg``.

        ``start_nodes_training_round(round, args_thr_msg, args_thr_files)`` does this itself
        (recorded in ``RoundSent``, uploaded when the round is published); this call is for
        code written against the seed.
        """
        for node, heavy in args_thr_files.items():
            for name, value in heavy.items():
                if name == "aggregator_name":
                    continue
                if isinstance(value, (str, Path)) and Path(value).is_file():
                    path, url = self.update_parameters(
                        filename=value, is_model_params=False, variable_name=name
                    )
                else:
                    path, url = self.update_parameters(
                        params=value, is_model_params=False, variable_name=name
                    )
                args_thr_msg.setdefault(node, {})[name] = {
                    "arg_name": name,
                    "filename": path,
                    "url": url,
                    "sha256": Path(path).name,
                }
        return args_thr_msg

    # ------------------------------------------------------------------ settings

    def change_settings(
        self,
        *,
        nodes: Iterable[str] | None = None,
        training_args: TrainingArgs | Mapping[str, Any] | None = None,
        round_limit: int | None = None,
    ) -> None:
        """Change the nodes, the training arguments or the round limit from the next round on
        (``SettingsChanged``). Raises ``RefusedByLifecycle`` (nothing recorded) for a change
        the job can not take: unknown nodes, fewer nodes than ``min_nodes``, a round limit
        behind the current round, or a job that is over (a completed one reopens only with a
        higher round limit)."""
        changes: dict[str, Any] = {}
        if nodes is not None:
            changes["nodes"] = sorted(nodes)
        if training_args is not None:
            args = (
                training_args
                if isinstance(training_args, TrainingArgs)
                else TrainingArgs(dict(training_args))
            )
            changes["training_args"] = args.dict()
        if round_limit is not None:
            changes["round_limit"] = round_limit
        try:
            event = SettingsChanged(round=self._state.round, changes=changes)
        except ValueError as exc:  # a value the log could not record
            raise JobError(f"these settings can not be recorded: {exc}") from None
        self._check_event(event)
        was_over = self._state.status.terminal
        self._record(event)
        # What this process did no longer holds for the changed job: new nodes are asked
        # about approval, a reopened job's new end is announced again.
        self._progress = replace(
            self._progress,
            approval_asked=self._progress.approval_asked and "nodes" not in changes,
            end_announced=self._progress.end_announced and not was_over,
        )

    @property
    def nodes(self) -> list[str]:
        """The nodes the next round goes to (sorted); settable between rounds (recorded)."""
        return list(self._state.nodes)

    @nodes.setter
    def nodes(self, value: Iterable[str]) -> None:
        self.change_settings(nodes=value)

    @property
    def training_args(self) -> TrainingArgs:
        """The training arguments of the next round; settable between rounds (recorded)."""
        return TrainingArgs(dict(self._state.training_args))

    @training_args.setter
    def training_args(self, value: TrainingArgs | Mapping[str, Any]) -> None:
        self.change_settings(training_args=value)
