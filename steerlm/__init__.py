"""SteerLM core: attribute schema, prompt template and tokenization.

This package is the single source of truth shared by training (`steer_train`), serving
(`model_repository/`) and the client. Its core modules import neither torch nor training code.
"""

from steerlm.schema import Attribute, AttributeSchema, SchemaError
from steerlm.spec import SteerSpec, load_spec, save_spec
from steerlm.template import PromptTemplate, Turn

__all__ = [
    "Attribute",
    "AttributeSchema",
    "PromptTemplate",
    "SchemaError",
    "SteerSpec",
    "Turn",
    "load_spec",
    "save_spec",
]
