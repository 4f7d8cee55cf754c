"""Learning-rate schedules of the training recipes (Keras schedules, saved with their config)."""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="defectscan")
class WarmUp(keras.optimizers.schedules.LearningRateSchedule):
    """`schedule`'s rate scaled by (step + 1) / steps over the first `steps` steps, then unchanged."""

    def __init__(self, schedule, steps: int):
        self.schedule = schedule
        self.steps = int(steps)

    def __call__(self, step):
        rate = self.schedule(step)
        ramp = keras.ops.minimum(1.0, (keras.ops.cast(step, "float32") + 1.0) / float(self.steps))
        return rate * keras.ops.cast(ramp, rate.dtype)

    def get_config(self):
        return {"schedule": keras.optimizers.schedules.serialize(self.schedule), "steps": self.steps}

    @classmethod
    def from_config(cls, config):
        return cls(keras.optimizers.schedules.deserialize(config["schedule"]), config["steps"])
