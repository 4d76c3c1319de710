"""Runs inside the clemcore virtual environment (not this project's): loads a model through clemcore's
model and backend registries and asks it one question, exactly as a clembench run does. Prints JSON.

    python clembench_driver.py MODEL_NAME   (in a folder holding key.json and model_registry.json)
"""

import json
import sys

from clemcore import backends

model = backends.load_model(sys.argv[1], gen_args={"temperature": 0.0, "max_tokens": 40})
prompt, response, text = model.generate_response([{"role": "user", "content": "Name three colors."}])
print(json.dumps({"text": text, "response": response}, default=str))
