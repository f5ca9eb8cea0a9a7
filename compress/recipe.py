"""Recipes: an ordered list of compression steps in YAML, validated whole before anything runs.

```yaml
name: prune-50-kd
description: half the channels, then distillation from the unpruned model
input_size: 32            # optional: image side in pixels the recipe is measured at
steps:
  - measure                       # a step without parameters
  - channel_prune: {ratio: 0.5}   # a one-key mapping: step name -> its parameters
  - distill:
      epochs: 3
      temperature: 4.0
```

Files are read with ``yaml.safe_load`` (tags such as ``!!python/object`` are refused). Every step name and every
parameter is checked against the step registry (:mod:`compress.steps`) before the first step runs: an unknown name
is an error naming it and the closest valid one, a wrong type or range names its path (``steps[2].ratio``), and a
required parameter that is missing is reported. A step function may also carry a ``check(params) -> problem or
None`` attribute for rules no single parameter expresses (``distill.check``: ``teacher_model`` needs ``teacher``);
it runs at validation too. ``load_recipe(path).steps`` then hold complete parameters (defaults filled in).

A number written as ``5e-4`` is a string to YAML 1.1 (PyYAML wants ``5.0e-4``); where a step expects a number,
such a string is read as the number it spells.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .steps import STEPS, Param, RecipeError, StepSpec, get_step

TOP_LEVEL_KEYS = ("name", "description", "input_size", "steps")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


@dataclass(frozen=True)
class StepCall:
    """One step of a recipe with its complete parameters (defaults filled in)."""

    name: str
    params: dict[str, Any]
    index: int  # position in the recipe's ``steps`` list, for messages (``steps[2]``)

    @property
    def spec(self) -> StepSpec:
        return get_step(self.name)

    @property
    def where(self) -> str:
        return f"steps[{self.index}]"


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. ``text`` is the YAML it was read from (copied next to the results)."""

    name: str
    steps: tuple[StepCall, ...]
    description: str = ""
    input_size: int | None = None  # image side in pixels, or None: the data's
    source: str = "<recipe>"  # file path, or where the recipe came from
    text: str = field(default="", repr=False, compare=False)

    @property
    def needs_data(self) -> list[StepCall]:
        """The steps that train or evaluate on data."""
        return [s for s in self.steps if s.spec.needs_data]

    def check_data(self, has_data: bool) -> None:
        """Raise :class:`RecipeError` if a step needs data and there is none."""
        missing = self.needs_data if not has_data else []
        if missing:
            names = ", ".join(f"{s.where} ({s.name})" for s in missing)
            verb = "needs" if len(missing) == 1 else "need"
            raise RecipeError(f"recipe {self.name!r}: {names} {verb} training data; pass data (a DataBundle from "
                              f"searchspace.data.load_data, or --data DIR on the command line)")

    def to_dict(self) -> dict[str, Any]:
        """Plain data: the recipe as it will run, every parameter spelled out."""
        return {"name": self.name, "description": self.description, "input_size": self.input_size,
                "source": self.source, "steps": [{s.name: dict(s.params)} for s in self.steps]}


# ------------------------------------------------------------------------------------------------- loading


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; every problem is a :class:`RecipeError` naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file {str(path)!r} does not exist (shipped recipes are in recipes/)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {str(path)!r}: {getattr(exc, 'strerror', None) or exc}") from None
    return recipe_from_yaml(text, source=str(path), default_name=path.stem)


def recipe_from_yaml(text: str, *, source: str = "<recipe>", default_name: str = "recipe") -> Recipe:
    """Parse recipe YAML (``yaml.safe_load``: plain data only) and validate it."""
    try:
        data = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as exc:
        tag = getattr(exc, "problem", "") or str(exc)
        raise RecipeError(f"recipe {source}: {_one_line(tag)}{_mark(exc)}; recipes are plain YAML data, "
                          f"tags such as !!python/... are refused") from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"recipe {source} is not valid YAML: {_one_line(problem)}{_mark(exc)}") from None
    return recipe_from_dict(data, source=source, default_name=default_name, text=text)


def recipe_from_dict(data: Any, *, source: str = "<recipe>", default_name: str = "recipe", text: str = "") -> Recipe:
    """Validate recipe data (a mapping as YAML gives it); see the module docstring for the format."""
    if not isinstance(data, Mapping):
        got = "an empty file" if data is None else type(data).__name__
        raise RecipeError(f"recipe {source} must be a mapping with a 'steps' list, got {got}")
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise RecipeError(f"recipe {source}: unknown key {key!r}{_suggest(key, TOP_LEVEL_KEYS)}")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise RecipeError(f"recipe {source}: name must be a non-empty string, got {name!r}")
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise RecipeError(f"recipe {source}: description must be a string, got {type(description).__name__}")
    input_size = data.get("input_size")
    if input_size is not None and (isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 8):
        raise RecipeError(f"recipe {source}: input_size must be an integer of at least 8 pixels, got {input_size!r}")
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        got = "nothing" if steps is None else repr(steps) if not isinstance(steps, list) else "an empty list"
        raise RecipeError(f"recipe {source}: 'steps' must be a non-empty list of steps, got {got}")
    calls = tuple(_parse_step(item, i, source) for i, item in enumerate(steps))
    return Recipe(name=name, steps=calls, description=description.strip(), input_size=input_size, source=source,
                  text=text)


def as_recipe(recipe: Recipe | str | Path | Mapping[str, Any]) -> Recipe:
    """A :class:`Recipe` from itself, a YAML file path or a mapping."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe)
    if isinstance(recipe, Mapping):
        return recipe_from_dict(recipe, text=yaml.safe_dump(dict(recipe), sort_keys=False))
    raise RecipeError(f"a recipe is a Recipe, a YAML file path or a mapping, got {type(recipe).__name__}")


# ---------------------------------------------------------------------------------------------- validation


def _parse_step(item: Any, index: int, source: str) -> StepCall:
    where = f"steps[{index}]"
    if isinstance(item, str):
        name, params = item, {}
    elif isinstance(item, Mapping) and len(item) == 1:
        name, params = next(iter(item.items()))
        params = {} if params is None else params
    else:
        shown = f"a mapping with keys {', '.join(map(repr, item))}" if isinstance(item, Mapping) else repr(item)
        raise RecipeError(f"recipe {source}: {where} must be a step name or a one-key mapping "
                          f"{{step_name: {{params}}}}, got {shown}")
    if not isinstance(name, str) or name not in STEPS:
        raise RecipeError(f"recipe {source}: {where}: unknown step {name!r}"
                          f"{_suggest(name, STEPS.names(), listing='steps')}")
    spec = get_step(name)
    if not isinstance(params, Mapping):
        raise RecipeError(f"recipe {source}: {where}.{name} must be a mapping of parameters, got {params!r}")
    complete = validate_params(spec, params, f"recipe {source}: {where}")
    check = getattr(spec.fn, "check", None)  # rules one parameter cannot express alone (see the docstring)
    problem = check(complete) if callable(check) else None
    if problem:
        raise RecipeError(f"recipe {source}: {where} ({name}): {problem}")
    return StepCall(name, complete, index)


def validate_params(spec: StepSpec, params: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Complete, checked parameters of ``spec``; errors name ``where.param``."""
    for key in params:
        if key not in spec.params:
            known = list(spec.params)
            raise RecipeError(f"{where}.{key}: unknown parameter of {spec.name}"
                              f"{_suggest(key, known, listing='parameters')}")
    out: dict[str, Any] = {}
    for key, param in spec.params.items():
        if key in params:
            out[key] = check_value(param, params[key], f"{where}.{key}")
        elif param.required:
            raise RecipeError(f"{where}.{key}: required parameter of {spec.name} is missing"
                              f"{': ' + param.help if param.help else ''}")
        else:
            out[key] = param.default
    return out


def check_value(param: Param, value: Any, where: str) -> Any:
    """``value`` checked against ``param`` (type, choices, range); returns it, numbers-as-strings converted."""
    types = param.type if isinstance(param.type, tuple) else (param.type,)
    if value is None:
        if type(None) in types or (not param.required and param.default is None):
            return None
        raise RecipeError(f"{where}: must be {describe_types(types)}, got null")
    wants_number = float in types or int in types
    if isinstance(value, str) and wants_number and str not in types and _NUMBER.fullmatch(value.strip()):
        number = float(value)
        value = int(number) if int in types and float not in types and number.is_integer() else number
    if not _is_instance(value, types):
        raise RecipeError(f"{where}: must be {describe_types(types)}, got {value!r} ({type(value).__name__})")
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"{where}: must be a finite number, got {value!r}")
    if param.choices is not None and value not in param.choices:
        choices = ", ".join(map(repr, param.choices))
        raise RecipeError(f"{where}: {value!r} is not one of {choices}{_suggest(value, param.choices, listing=None)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if param.minimum is not None and value < param.minimum:
            raise RecipeError(f"{where}: must be at least {param.minimum}{_range(param)}, got {value!r}")
        if param.maximum is not None and value > param.maximum:
            raise RecipeError(f"{where}: must be at most {param.maximum}{_range(param)}, got {value!r}")
    if float in types and isinstance(value, int) and not isinstance(value, bool) and int not in types:
        value = float(value)
    return value


def _is_instance(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # YAML's true/false are not numbers
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    if isinstance(value, list) and tuple in types:
        return True
    return isinstance(value, types)


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
               tuple: "a list", dict: "a mapping", type(None): "null"}


def describe_types(types: tuple[type, ...]) -> str:
    words = [_TYPE_WORDS.get(t, t.__name__) for t in types]
    if "a number" in words and "an integer" in words:
        words.remove("an integer")
    return " or ".join(dict.fromkeys(words))


def _range(param: Param) -> str:
    low = "" if param.minimum is None else f"{param.minimum}"
    high = "" if param.maximum is None else f"{param.maximum}"
    return f" (range {low or '-inf'} to {high or 'inf'})" if low and high else ""


def _suggest(name: Any, known: Any, listing: str | None = "keys") -> str:
    known = [str(k) for k in known]
    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
    if close:
        return f"; did you mean {close[0]!r}?"
    if listing is None or not known:
        return ""
    return f"; known {listing}: {', '.join(known)}"


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _mark(exc: Exception) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
