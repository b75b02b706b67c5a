"""__NAME__: a Lathe validator (`lathe:plugin/validator`), built by `lathe plugin build` with
componentize-py against wit/."""
import wit_world
from componentize_py_types import Err
from wit_world.imports import types


class WitWorld(wit_world.WitWorld):
    def info(self) -> types.Info:
        schema = '{"type":"object","additionalProperties":false}'
        return types.Info("__NAME__", "0.1.0", types.Kind.VALIDATOR, "The output must not be empty", schema)

    def configure(self, config: str) -> None:
        pass

    def validate(self, output: str) -> None:
        if not output.strip():
            raise Err([types.Violation("", "empty output")])
