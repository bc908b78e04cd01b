# Manual compatibility check (issue 12): run `fedsea serve --port 8123`, then, in a
# scratch virtualenv with `pip install langchain-openai`, `python langchain.py`.
from pydantic import BaseModel
from langchain_openai import ChatOpenAI
from langchain_core.tools import tool
llm = ChatOpenAI(base_url="http://127.0.0.1:8123/v1", api_key="unused", model="smollm2-135m-instruct", temperature=0, max_tokens=60)
class City(BaseModel):
    city: str
    country: str
res = []
def check(name, fn):
    try: res.append(("ok", name, repr(fn())[:150]))
    except Exception as e: res.append(("FAIL", name, repr(e)[:200]))
check("invoke", lambda: llm.invoke("What is the capital of France?").content)
check("stream", lambda: "".join(c.content for c in llm.stream("Say hi")))
for method in ("json_schema", "function_calling", "json_mode"):
    check(f"with_structured_output {method}", lambda m=method: llm.with_structured_output(City, method=m).invoke("Name a city and its country. Answer in JSON with keys city and country."))
@tool
def get_weather(city: str) -> str:
    """Weather in a city."""
    return "sunny"
check("bind_tools required", lambda: llm.bind_tools([get_weather], tool_choice="required").invoke("Weather in Paris?").tool_calls)
check("bind_tools auto", lambda: llm.bind_tools([get_weather]).invoke("Weather in Paris?").tool_calls)
for r in res: print(*r)
