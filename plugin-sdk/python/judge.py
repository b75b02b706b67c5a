"""__NAME__: a Lathe judge prompt (`lathe:plugin/judge`), built by `lathe plugin build` with
componentize-py against wit/."""
import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import types


class WitWorld(wit_world.WitWorld):
    def info(self) -> types.Info:
        schema = '{"type":"object","additionalProperties":false}'
        return types.Info("__NAME__", "0.1.0", types.Kind.JUDGE, "Asks the judge for a yes/no verdict", schema)

    def configure(self, config: str) -> None:
        pass

    def build_prompt(self, input: str, output: str, reference: str | None) -> list[types.Message]:
        return [types.Message("user", f"Task: {input}\nAnswer: {output}\nIs the answer correct? Reply yes or no.")]

    def parse_verdict(self, answer: str) -> types.Judgment:
        a = answer.strip().lower()
        if a.startswith("yes"):
            return types.Judgment(1.0, answer)
        if a.startswith("no"):
            return types.Judgment(0.0, answer)
        raise Err(f"expected yes or no, got {json.dumps(answer)}")
