from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IntList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, values: _Optional[_Iterable[int]] = ...) -> None: ...

class StrList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class FeatureValue(_message.Message):
    __slots__ = ("int_value", "str_value", "float_value", "int_list", "str_list")
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    STR_VALUE_FIELD_NUMBER: _ClassVar[int]
    FLOAT_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_LIST_FIELD_NUMBER: _ClassVar[int]
    STR_LIST_FIELD_NUMBER: _ClassVar[int]
    int_value: int
    str_value: str
    float_value: float
    int_list: IntList
    str_list: StrList
    def __init__(self, int_value: _Optional[int] = ..., str_value: _Optional[str] = ..., float_value: _Optional[float] = ..., int_list: _Optional[_Union[IntList, _Mapping]] = ..., str_list: _Optional[_Union[StrList, _Mapping]] = ...) -> None: ...

class Features(_message.Message):
    __slots__ = ("values",)
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: FeatureValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[FeatureValue, _Mapping]] = ...) -> None: ...
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.MessageMap[str, FeatureValue]
    def __init__(self, values: _Optional[_Mapping[str, FeatureValue]] = ...) -> None: ...

class Column(_message.Message):
    __slots__ = ("int_values", "float_values", "str_values", "lengths")
    INT_VALUES_FIELD_NUMBER: _ClassVar[int]
    FLOAT_VALUES_FIELD_NUMBER: _ClassVar[int]
    STR_VALUES_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    int_values: _containers.RepeatedScalarFieldContainer[int]
    float_values: _containers.RepeatedScalarFieldContainer[float]
    str_values: _containers.RepeatedScalarFieldContainer[str]
    lengths: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, int_values: _Optional[_Iterable[int]] = ..., float_values: _Optional[_Iterable[float]] = ..., str_values: _Optional[_Iterable[str]] = ..., lengths: _Optional[_Iterable[int]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("context", "candidates", "request_id", "columns")
    class ColumnsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Column
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Column, _Mapping]] = ...) -> None: ...
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    context: Features
    candidates: _containers.RepeatedCompositeFieldContainer[Features]
    request_id: str
    columns: _containers.MessageMap[str, Column]
    def __init__(self, context: _Optional[_Union[Features, _Mapping]] = ..., candidates: _Optional[_Iterable[_Union[Features, _Mapping]]] = ..., request_id: _Optional[str] = ..., columns: _Optional[_Mapping[str, Column]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("scores", "model_version", "request_id", "lookup_ms", "tower_ms")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_MS_FIELD_NUMBER: _ClassVar[int]
    TOWER_MS_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    model_version: int
    request_id: str
    lookup_ms: float
    tower_ms: float
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., model_version: _Optional[int] = ..., request_id: _Optional[str] = ..., lookup_ms: _Optional[float] = ..., tower_ms: _Optional[float] = ...) -> None: ...
