"""The request-body schemas (``trellis.api.schemas``): the shared fields and the error shape.

The schemas of each resource are exercised through the HTTP API by their endpoint tests
(test_api_errors, test_intentions_api, test_acl_api, test_ca_api); this file pins what they
all share, on the schemas alone.
"""

from __future__ import annotations

import pytest
from marshmallow import fields

from trellis.api.errors import BadRequest
from trellis.api.schemas import FiniteNumber, Ignored, Rejected, Strict, StrictBoolean, load
from trellis.api.schemas.catalog import CatalogRegisterSchema, ServiceSchema


class _Inner(Strict):
    N = fields.Integer(strict=True)


class _Body(Strict):
    Flag = StrictBoolean()
    Rate = FiniteNumber()
    Hash = Ignored()
    Permissions = Rejected("L7 Permissions are not supported")
    Inner = fields.Nested(_Inner)
    Items = fields.List(fields.Nested(_Inner))
    Meta = fields.Dict(keys=fields.String(), values=fields.String())


def message(data) -> str:
    with pytest.raises(BadRequest) as e:
        load(_Body(), data)
    return e.value.message


@pytest.mark.parametrize(
    ("data", "expect"),
    [
        ({"Bogus": 1}, "Bogus: Unknown field."),
        ({"Inner": {"N": "1"}}, "Inner.N: Not a valid integer."),
        ({"Inner": []}, "Inner: Invalid input type."),
        ({"Items": [{"N": 1}, {"X": 1}]}, "Items.1.X: Unknown field."),
        ({"Meta": {"k": 1}}, "Meta.k: Not a valid string."),
        ({"Flag": "yes"}, "Flag: must be true or false"),
        ({"Permissions": None}, "Permissions: L7 Permissions are not"),
    ],
)
def test_every_problem_names_its_field(data, expect):
    assert message(data).startswith(expect)


def test_every_problem_is_reported_at_once():
    got = message({"Flag": 1, "Rate": "1", "Bogus": 2})
    assert "Flag: must be true or false" in got
    assert "Rate: must be a number" in got
    assert "Bogus: Unknown field." in got


def test_a_problem_with_the_whole_object_names_the_object():
    # A schema-level message (marshmallow's "_schema") is the object's, not a field's.
    body = {"Node": "n", "Address": "a", "Service": {"Name": "s", "Meta": {"k": "v" * 513}}}
    with pytest.raises(BadRequest) as e:
        load(CatalogRegisterSchema(), body)
    assert "_schema" not in e.value.message
    expected = "Service.Meta: value of 'k' must be a string of at most 512 characters"
    assert expected in e.value.message
    with pytest.raises(BadRequest) as e:
        load(ServiceSchema(), {"Name": "s", "Check": {"TTL": "1s", "HTTP": "http://x"}})
    assert "Check: a check has one type" in e.value.message


@pytest.mark.parametrize("value", [True, False])
def test_strict_boolean_takes_only_booleans(value):
    assert load(_Body(), {"Flag": value}) == {"Flag": value}
    for bad in ("true", 1, 0, None, "yes", "on", []):
        assert "Flag: must be true or false" in message({"Flag": bad})


def test_finite_number_takes_json_numbers_only():
    for good in (0, 1, 0.5, 1e300, -3, 2**70):
        assert load(_Body(), {"Rate": good}) == {"Rate": good}
    # 1e400 in a JSON body parses as float infinity; 10**400 cannot become a float at all.
    for bad in (float("inf"), float("-inf"), float("nan"), 10**400, True, "1", None, [1]):
        assert "Rate: must be a number" in message({"Rate": bad})


def test_ignored_fields_take_anything_and_are_dropped():
    for value in (None, "", 0, {"a": 1}, [1]):
        assert load(_Body(), {"Hash": value, "Flag": True}) == {"Flag": True}


def test_a_prefix_and_another_subject():
    with pytest.raises(BadRequest) as e:
        load(_Body(), {"Rate": "x"}, path="Config", what="invalid connect.ca_config")
    assert e.value.message == "invalid connect.ca_config: Config.Rate: must be a number"
