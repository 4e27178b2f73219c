from idealrt.common.v1 import common_pb2 as _common_pb2
from idealrt.common.v1 import resources_pb2 as _resources_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateProfileRequest(_message.Message):
    __slots__ = ("request_id", "profile")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    profile: _resources_pb2.Profile
    def __init__(self, request_id: _Optional[str] = ..., profile: _Optional[_Union[_resources_pb2.Profile, _Mapping]] = ...) -> None: ...

class CreateProfileResponse(_message.Message):
    __slots__ = ("profile", "created")
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    profile: _resources_pb2.Profile
    created: bool
    def __init__(self, profile: _Optional[_Union[_resources_pb2.Profile, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class GetProfileRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetProfileResponse(_message.Message):
    __slots__ = ("profile",)
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    profile: _resources_pb2.Profile
    def __init__(self, profile: _Optional[_Union[_resources_pb2.Profile, _Mapping]] = ...) -> None: ...

class UpdateProfileRequest(_message.Message):
    __slots__ = ("profile",)
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    profile: _resources_pb2.Profile
    def __init__(self, profile: _Optional[_Union[_resources_pb2.Profile, _Mapping]] = ...) -> None: ...

class UpdateProfileResponse(_message.Message):
    __slots__ = ("profile",)
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    profile: _resources_pb2.Profile
    def __init__(self, profile: _Optional[_Union[_resources_pb2.Profile, _Mapping]] = ...) -> None: ...

class ListProfilesRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "states", "namespaces")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    states: _containers.RepeatedScalarFieldContainer[_resources_pb2.ProfileState]
    namespaces: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., states: _Optional[_Iterable[_Union[_resources_pb2.ProfileState, str]]] = ..., namespaces: _Optional[_Iterable[str]] = ...) -> None: ...

class ListProfilesResponse(_message.Message):
    __slots__ = ("profiles", "next_page_token")
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    profiles: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Profile]
    next_page_token: str
    def __init__(self, profiles: _Optional[_Iterable[_Union[_resources_pb2.Profile, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class AppendSamplesRequest(_message.Message):
    __slots__ = ("profile_id", "batch_id", "samples")
    PROFILE_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    profile_id: str
    batch_id: str
    samples: _containers.RepeatedCompositeFieldContainer[_common_pb2.Sample]
    def __init__(self, profile_id: _Optional[str] = ..., batch_id: _Optional[str] = ..., samples: _Optional[_Iterable[_Union[_common_pb2.Sample, _Mapping]]] = ...) -> None: ...

class AppendSamplesResponse(_message.Message):
    __slots__ = ("appended", "total_samples")
    APPENDED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    appended: int
    total_samples: int
    def __init__(self, appended: _Optional[int] = ..., total_samples: _Optional[int] = ...) -> None: ...

class ListSamplesRequest(_message.Message):
    __slots__ = ("profile_id", "page_size", "page_token")
    PROFILE_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    profile_id: str
    page_size: int
    page_token: str
    def __init__(self, profile_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSamplesResponse(_message.Message):
    __slots__ = ("samples", "next_page_token")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    samples: _containers.RepeatedCompositeFieldContainer[_common_pb2.Sample]
    next_page_token: str
    def __init__(self, samples: _Optional[_Iterable[_Union[_common_pb2.Sample, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CreateCostModelRequest(_message.Message):
    __slots__ = ("request_id", "cost_model")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    COST_MODEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    cost_model: _resources_pb2.CostModel
    def __init__(self, request_id: _Optional[str] = ..., cost_model: _Optional[_Union[_resources_pb2.CostModel, _Mapping]] = ...) -> None: ...

class CreateCostModelResponse(_message.Message):
    __slots__ = ("cost_model", "created")
    COST_MODEL_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    cost_model: _resources_pb2.CostModel
    created: bool
    def __init__(self, cost_model: _Optional[_Union[_resources_pb2.CostModel, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class GetCostModelRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetCostModelResponse(_message.Message):
    __slots__ = ("cost_model",)
    COST_MODEL_FIELD_NUMBER: _ClassVar[int]
    cost_model: _resources_pb2.CostModel
    def __init__(self, cost_model: _Optional[_Union[_resources_pb2.CostModel, _Mapping]] = ...) -> None: ...

class ListCostModelsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "profile_id", "namespaces")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROFILE_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    profile_id: str
    namespaces: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., profile_id: _Optional[str] = ..., namespaces: _Optional[_Iterable[str]] = ...) -> None: ...

class ListCostModelsResponse(_message.Message):
    __slots__ = ("cost_models", "next_page_token")
    COST_MODELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    cost_models: _containers.RepeatedCompositeFieldContainer[_resources_pb2.CostModel]
    next_page_token: str
    def __init__(self, cost_models: _Optional[_Iterable[_Union[_resources_pb2.CostModel, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
