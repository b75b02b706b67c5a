"""__NAME__: a Lathe formatter (`lathe:plugin/formatter`), built by `lathe plugin build` with
componentize-py against wit/."""
import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import types


class WitWorld(wit_world.WitWorld):
    def info(self) -> types.Info:
        schema = '{"type":"object","additionalProperties":false}'
        return types.Info("__NAME__", "0.1.0", types.Kind.FORMATTER, "question/answer records to chats", schema)

    def configure(self, config: str) -> None:
        pass

    def format(self, record: str) -> types.Example:
        r = json.loads(record)

        def field(k: str) -> str:
            v = r.get(k) if isinstance(r, dict) else None
            if not isinstance(v, str):
                raise Err(types.FieldError(k, "missing or not a string"))
            return v

        return types.Example_Chat([types.Message("user", field("question")), types.Message("assistant", field("answer"))])
