"""The one settings loader: a shipped YAML of defaults <- the user's YAML <- overrides, validated by a
pydantic model, every error an InputError naming file, line, field, what was expected and the fix.

Every flow's settings come through `load_settings` (configs/pilot.yaml via `config.load_pilot_config`,
configs/sft.yaml, configs/eval.yaml); `input_error` is the one place a pydantic ValidationError
becomes an InputError. The YAML reader is hardened: repeated keys, alias bombs, forbidden characters
and unconstructible tagged scalars are errors with their line, never silently accepted.

    from stage1_core.infra import settings
    cfg = settings.load_settings(SFTSettings, CONFIGS_DIR / "sft.yaml", "my.yaml", docs="docs/sft.md")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from stage1_core.infra.errors import InputError

M = TypeVar("M", bound=BaseModel)

MAX_ALIAS_NODES = 100_000
"""Most YAML nodes that aliases (*name) may add beyond the file's own: more is an alias bomb."""

MAX_ALIAS_CHARS = 1_000_000
"""Most scalar characters that aliases may add beyond the file's own (a repeated prompt is a few KB)."""


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `over` onto `base` (dicts merge, everything else replaces)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _yaml_line(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the deepest node of `loc` found in a composed YAML tree."""
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for k, v in node.value:
                if k.value == str(key):
                    line = k.start_mark.line + 1
                    nxt = v
                    break
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def read_yaml_mapping(path: Path) -> tuple[dict[str, Any], yaml.Node | None]:
    """Parse a YAML file that must hold a mapping; InputError with the line otherwise."""
    if not path.is_file():
        raise InputError(f"config file not found: {path}", file=str(path), expected="a YAML file", fix="check the --config path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError("config file is not UTF-8", file=str(path), expected="UTF-8 YAML", fix="re-save the file as UTF-8") from e
    try:
        node = yaml.compose(text)
        _check_nodes(node, str(path))
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = (mark.line + 1) if mark else None
        if isinstance(e, yaml.reader.ReaderError):  # a forbidden character (NUL, C1 controls): no mark, a position
            line = text.count("\n", 0, e.position) + 1
        raise InputError(f"invalid YAML: {getattr(e, 'problem', e)}", file=str(path), line=line,
                         expected="valid YAML", fix="fix the syntax at that line") from None
    except RecursionError:
        raise InputError("YAML is nested too deeply to read", file=str(path), expected="the layout of configs/pilot.yaml "
                         "(a few levels of key: value)", fix="check that this is a config file") from None
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError) as e:
        # PyYAML's constructors fail on some tagged or huge scalars (`!!int ` empty, `!!float x`,
        # `!!bool x`, `!!timestamp x`, an integer of more than 4,300 digits) with plain Python errors.
        line = _bad_scalar_line(node)
        raise InputError(f"invalid YAML value: {e}", file=str(path), line=line, expected="a value of the type its tag "
                         "(!!int, !!float, !!timestamp...) or its digits say, of at most 4,300 digits",
                         fix="correct the value, or quote it to make it a string") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError("config must be a YAML mapping of keys to values", file=str(path), line=1,
                         expected="key: value pairs at the top level", fix="see configs/pilot.yaml for the layout")
    return data, node


def _bad_scalar_line(root: yaml.Node | None) -> int | None:
    """1-based line of the first scalar that PyYAML's safe constructor cannot build, if any."""
    stack, seen = ([root] if root is not None else []), set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            try:
                yaml.constructor.SafeConstructor().construct_object(node)
            except Exception:  # noqa: BLE001 -- any failure locates the value
                return node.start_mark.line + 1
        elif isinstance(node, yaml.MappingNode):
            stack.extend(x for pair in reversed(node.value) for x in reversed(pair))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(reversed(node.value))
    return None


def _check_nodes(root: yaml.Node | None, file: str) -> None:
    """Reject repeated keys in a mapping and alias bombs, walking the composed tree without recursion.

    PyYAML keeps the last of two equal keys silently, and composes an alias as the anchored node
    itself, so nine aliases of a list of nine aliases... expand to millions of values (or, for an
    alias inside its own anchor, forever) when the config is later dumped or hashed.
    """
    seen: set[int] = set()
    extra_nodes = extra_chars = 0
    stack: list[tuple[yaml.Node, str]] = [(root, "")] if root is not None else []
    while stack:
        node, where = stack.pop()
        again = id(node) in seen
        if again:  # reached again through an alias (its expansion is reported at the alias's place)
            extra_nodes += 1
            extra_chars += len(node.value) if isinstance(node, yaml.ScalarNode) else 0
            if extra_nodes > MAX_ALIAS_NODES or extra_chars > MAX_ALIAS_CHARS:
                raise InputError("YAML aliases expand too much (an alias bomb, or an alias inside its own anchor)",
                                 file=file, line=node.start_mark.line + 1, field=where or None,
                                 expected=f"aliases (*name) that add at most {MAX_ALIAS_NODES:,} values and "
                                          f"{MAX_ALIAS_CHARS:,} characters",
                                 fix="write the values out, or remove the aliases") from None
        else:
            seen.add(id(node))
            if isinstance(node, yaml.MappingNode):
                first: dict[tuple[str, str], int] = {}
                for k, _ in node.value:
                    if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                        line = k.start_mark.line + 1
                        if (k.tag, k.value) in first:
                            field = f"{where}.{k.value}" if where else str(k.value)
                            raise InputError(f"key '{k.value}' appears twice (lines {first[k.tag, k.value]} and {line}); "
                                             "YAML would silently keep the last", file=file, line=line, field=field,
                                             expected="each key at most once per mapping", fix="remove one of the two")
                        first[k.tag, k.value] = line
        if isinstance(node, yaml.MappingNode):
            for k, v in reversed(node.value):
                label = str(k.value) if isinstance(k, yaml.ScalarNode) else "?"
                stack.append((v, where if again else f"{where}.{label}" if where else label))
                stack.append((k, where))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((v, where if again else f"{where}.{i}" if where else str(i))
                         for i, v in reversed(list(enumerate(node.value))))


def _expected_from(err: dict[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    if "gt" in ctx:
        return f"a number > {ctx['gt']}"
    if "ge" in ctx:
        return f"a number >= {ctx['ge']}"
    if "le" in ctx:
        return f"a number <= {ctx['le']}"
    if "expected" in ctx:
        return f"one of {ctx['expected']}"
    return err["msg"].removeprefix("Value error, ")


def input_error(e: ValidationError, *, source: str | None, node: yaml.Node | None = None, prefix: str = "",
                docs: str, fix: str | None = None) -> InputError:
    """The first error of a ValidationError as an InputError: the field (`prefix` + its dotted
    location), the file and line (`source`, and `node`, the composed YAML, for the line), what was
    expected (bounds, choices, or for an unknown key the documented keys, `docs`) and the fix."""
    err = e.errors()[0]
    loc = tuple(err["loc"])
    field = prefix + ".".join(str(p) for p in loc)
    unknown = err["type"] == "extra_forbidden"
    if unknown:
        msg, expected = f"unknown config key '{field}'", f"only the documented keys ({docs})"
    else:
        msg, expected = f"invalid value for '{field}': {err['msg'].removeprefix('Value error, ')}", _expected_from(err)
    more = len(e.errors()) - 1
    if more:
        msg += f" (and {more} more problem{'s' if more > 1 else ''})"
    line = _yaml_line(node, loc) if node is not None else None
    return InputError(msg, file=source, line=line, field=field, expected=expected,
                      fix=fix or ("remove or rename the key" if unknown else "correct the value"))


def validate(model: type[M], data: dict[str, Any], *, source: str | None, node: yaml.Node | None = None,
             docs: str) -> M:
    """`model.model_validate(data)`, its first error raised as `input_error`."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise input_error(e, source=source, node=node, docs=docs) from None


def load_settings(model: type[M], default: Path, config: str | Path | None = None,
                  overrides: dict[str, Any] | None = None, *, docs: str,
                  flags: Mapping[str, str] | None = None) -> M:
    """A flow's settings: `default` (a shipped YAML) <- the user's YAML (deep-merged) <- `overrides`
    (deep-merged; CLI flags or flow parameters), validated by `model`.

    Args:
        docs: where the keys are documented, for an unknown key's `expected`.
        flags: dotted key -> the CLI flag that sets it, for an override's fix ("correct --count").
    Raises:
        InputError: the file is missing or not a YAML mapping, or a value is invalid: the user's file
            and line for its own keys, "command line" and the flag for an override.
    """
    base, _ = read_yaml_mapping(default)
    data, node, source = base, None, str(default)
    if config is not None:
        user, node = read_yaml_mapping(Path(config))
        data, source = deep_merge(base, user), str(config)
        validate(model, data, source=source, node=node, docs=docs)  # errors point at the user's file
    if overrides:
        try:
            return model.model_validate(deep_merge(data, overrides))
        except ValidationError as e:
            err = input_error(e, source="command line", docs=docs)
            flag = (flags or {}).get(err.field or "", "--" + (err.field or "").split(".")[-1].replace("_", "-"))
            err.fix = f"correct {flag}"
            raise err from None
    return validate(model, data, source=source, node=node, docs=docs)
