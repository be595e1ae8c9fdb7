"""The exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """A problem the user can fix (bad path, bad size, stale or corrupt bundle); never a bug."""


class RefitError(UserError):
    """A weight swap that failed; `changed` says whether some weights may already have been replaced (the engines
    then hold a mix of old and new weights and must not run again)."""

    def __init__(self, message: str, changed: bool):
        super().__init__(message)
        self.changed = changed


# How each generation setting is spelled: as `lcmtrt infer`/`bench` flags and as API request fields
CLI_FLAGS = {"steps": "--steps", "timesteps": "--timesteps", "eta": "--eta", "scheduler": "--scheduler",
             "strength": "--strength", "img2img_mode": "--img2img-mode",
             "original_inference_steps": "--original-inference-steps"}
API_FIELDS = {"steps": "num_inference_steps", "timesteps": "timesteps", "eta": "eta", "scheduler": "scheduler",
              "strength": "strength", "img2img_mode": "img2img_mode",
              "original_inference_steps": "original_inference_steps"}


class SettingError(UserError):
    """A bad generation setting. `template` names settings as {steps}, {eta}, ...: str() spells them as the CLI's
    flags, api_message() as the API's fields, so each front end names what its user typed."""

    def __init__(self, setting: str, template: str):
        super().__init__(template.format_map(CLI_FLAGS))
        self.setting, self.template = setting, template

    @property
    def api_param(self) -> str:
        return API_FIELDS[self.setting]

    def api_message(self) -> str:
        return self.template.format_map(API_FIELDS)
