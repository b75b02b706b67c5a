"""__NAME__: a Lathe scorer (`lathe:plugin/scorer`), built by `lathe plugin build` with
componentize-py against wit/."""
import wit_world
from wit_world.imports import types


def texts(batch: types.TextBatch) -> list[str]:
    """The strings of a batch: string i is data[offsets[i]:offsets[i + 1]]."""
    data, o = bytes(batch.data), batch.offsets
    return [data[o[i]:o[i + 1]].decode() for i in range(len(o) - 1)]


def value(prediction: str, reference: str) -> float:
    return 1.0 if reference.strip() in prediction else 0.0


class WitWorld(wit_world.WitWorld):
    def info(self) -> types.Info:
        schema = '{"type":"object","additionalProperties":false}'
        return types.Info("__NAME__", "0.1.0", types.Kind.SCORER, "1 when the prediction contains the reference", schema)

    def configure(self, config: str) -> None:
        pass

    def score(self, prediction: str, reference: str) -> types.Score:
        return types.Score(value(prediction, reference), [])

    def score_batch(self, predictions: types.TextBatch, references: types.TextBatch) -> list[float]:
        return [value(p, r) for p, r in zip(texts(predictions), texts(references))]

    def aggregate(self, predictions: types.TextBatch, references: types.TextBatch) -> list[types.FieldScore]:
        scores = self.score_batch(predictions, references)
        return [types.FieldScore("mean", sum(scores) / len(scores))] if scores else []
