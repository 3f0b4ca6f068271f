//! `GET /openapi.json`: an OpenAPI 3.0 description of every route and its schemas, for API
//! fuzzers and client generators. Written by hand next to the router; the tests below check that
//! it lists exactly the routes of [`super::routes`], that every `$ref` resolves, and that the
//! request schemas name the same fields as the request types.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::engine::NoticeKind;
use crate::families::FamilyKind;
use crate::memory::planner::MemoryMode;
use crate::queue::FailureKind;
use crate::request::{
    MAX_CFG, MAX_EXCLUDED_PHRASES, MAX_EXCLUDE_CHARS, MAX_PROMPT_CHARS, MAX_SIDE, MAX_STEPS,
    MIN_CFG, MIN_SIDE, MIN_STEPS,
};

fn schema(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn json_body(name: &str) -> Value {
    json!({ "application/json": { "schema": schema(name) } })
}

fn ok(description: &str, name: &str) -> Value {
    json!({ "description": description, "content": json_body(name) })
}

fn error_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/responses/{name}") })
}

/// A `text/event-stream` response whose `schema` describes one event, the way SSE-aware tools
/// read it (schemathesis checks every parsed event `{event, data, id?, retry?}` against it; OpenAPI
/// 3.2 calls this `itemSchema`): one branch per event name, and the schema of the JSON text in
/// `data` under `x-data-schema`.
fn sse(description: &str, events: &[(&str, &str)]) -> Value {
    let branches: Vec<Value> = events
        .iter()
        .map(|(name, payload)| {
            json!({
                "type": "object",
                "required": ["event", "data"],
                "properties": {
                    "event": { "type": "string", "enum": [name] },
                    "data": { "type": "string", "description": format!("JSON text: {payload}"),
                              "x-data-schema": schema(payload) },
                    "id": { "type": "string" },
                    "retry": { "type": "integer" },
                }
            })
        })
        .collect();
    json!({
        "description": description,
        "content": { "text/event-stream": { "schema": { "oneOf": branches } } }
    })
}

/// The events of `GET /api/jobs/{id}/events`: name and payload schema.
pub const JOB_EVENTS: [(&str, &str); 9] = [
    ("queued", "JobQueuedEvent"),
    ("started", "EmptyEvent"),
    ("progress", "JobProgressEvent"),
    ("model", "JobModelEvent"),
    ("preview", "JobPreviewEvent"),
    ("notice", "Notice"),
    ("done", "JobDoneEvent"),
    ("failed", "Error"),
    ("cancelled", "EmptyEvent"),
];
/// The events of `GET /api/models/{name}/pull/events`.
pub const PULL_EVENTS: [(&str, &str); 3] = [
    ("progress", "PullProgressEvent"),
    ("done", "PullDoneEvent"),
    ("failed", "PullFailedEvent"),
];
/// The events of `GET /api/events`.
pub const SERVER_EVENTS: [(&str, &str); 1] = [("model", "ModelSwitchEvent")];
/// The events of `GET /api/memory/stream`.
pub const MEMORY_EVENTS: [(&str, &str); 1] = [("sample", "MemorySample")];

fn path_param(name: &str, description: &str) -> Value {
    json!({ "name": name, "in": "path", "required": true, "description": description,
            "schema": { "type": "string" } })
}

/// An operation with the responses every route may give (the guard's 401 and 403).
fn op(id: &str, tag: &str, summary: &str, mut responses: Value) -> Value {
    let (unauth, forbidden) = match tag {
        "openai" => ("OpenAiUnauthorized", "OpenAiForbidden"),
        "a1111" => ("A1111Unauthorized", "A1111Forbidden"),
        _ => ("Unauthorized", "Forbidden"),
    };
    let guesses = match tag {
        "openai" => "OpenAiTooManyGuesses",
        "a1111" => "A1111TooManyGuesses",
        _ => "TooManyGuesses",
    };
    if let Some(r) = responses.as_object_mut() {
        r.entry("401").or_insert_with(|| error_ref(unauth));
        r.entry("403").or_insert_with(|| error_ref(forbidden));
        // The key's rate limit, where a key is checked.
        if !matches!(tag, "ui" | "meta") {
            r.entry("429").or_insert_with(|| error_ref(guesses));
        }
    }
    json!({ "operationId": id, "tags": [tag], "summary": summary, "responses": responses })
}

fn with(mut operation: Value, key: &str, value: Value) -> Value {
    if let Some(o) = operation.as_object_mut() {
        o.insert(key.to_string(), value);
    }
    operation
}

fn body(operation: Value, name: &str) -> Value {
    with(
        operation,
        "requestBody",
        json!({ "required": true, "content": json_body(name) }),
    )
}

fn paths() -> Value {
    let job_id = path_param("id", "a job id (16 hex digits)");
    let catalog: Vec<&str> = crate::families::catalog::CATALOG
        .iter()
        .map(|e| e.name)
        .collect();
    let model_name = path_param("name", &format!("a catalog model: {}", catalog.join(", ")));
    let ui = json!({
        "/": { "get": op("ui", "ui", "The web UI", json!({ "200": { "description": "HTML page", "content": { "text/html": { "schema": { "type": "string" } } } } })) },
        "/index.html": { "get": op("ui_index", "ui", "The web UI", json!({ "200": { "description": "HTML page", "content": { "text/html": { "schema": { "type": "string" } } } } })) },
        "/app.js": { "get": op("ui_script", "ui", "The UI's entry module (it imports the others, served from static/ at their paths)", json!({ "200": { "description": "JavaScript (ES module)", "content": { "text/javascript": { "schema": { "type": "string" } } } } })) },
        "/style.css": { "get": op("ui_style", "ui", "The UI's style sheet", json!({ "200": { "description": "CSS", "content": { "text/css": { "schema": { "type": "string" } } } } })) },
        "/openapi.json": { "get": op("openapi", "meta", "This document", json!({ "200": { "description": "OpenAPI 3.0 document", "content": { "application/json": { "schema": { "type": "object" } } } } })) },
        "/images/{file}": { "get": with(op("image", "images", "An image the server wrote (`<job>-<n>.png`)", json!({
            "200": { "description": "PNG with `parameters` (A1111 infotext) and `zturbo` (JSON record) text chunks", "content": { "image/png": { "schema": { "type": "string", "format": "binary" } } } },
            "404": error_ref("NotFound"),
        })), "parameters", json!([
            path_param("file", "`<job id>-<n>.png`"),
            { "name": "sig", "in": "query", "required": false, "description": "signature from an OpenAI `url` response (opens the image without a key)", "schema": { "type": "string" } },
            { "name": "download", "in": "query", "required": false, "description": "`1`: an attachment named after the prompt, the image's seed and its index (`Content-Disposition`)", "schema": { "type": "string", "enum": ["1"] } }
        ])) },
        "/api/health": { "get": op("health", "server", "Liveness, the loaded model, and whether the outputs folder can be written", json!({ "200": ok("`ok`, or `degraded` with the `reason`", "Health") })) },
        "/api/info": { "get": op("info", "server", "Model, limits, device and queue facts for the form", json!({ "200": ok("server facts", "Info") })) },
        "/api/auth": {
            "get": op("auth_status", "server", "Whether an API key is required and whether this client has it", json!({ "200": ok("status", "AuthStatus") })),
            "post": body(op("auth", "server", "Check the API key and set the UI's cookie", json!({
                "204": { "description": "key accepted (cookie set when a key is configured)" },
                "400": error_ref("BadRequest"), "415": error_ref("UnsupportedMediaType"), "422": error_ref("Invalid"),
            })), "AuthRequest"),
        },
        "/api/models": { "get": op("models", "models", "Known and local models, and the running download", json!({ "200": ok("models", "ModelList") })) },
        "/api/models/{name}/pull": { "post": with(op("pull_model", "models", "Download a catalog model (or one of its quantized variants) into the Hugging Face cache", json!({
            "202": ok("download started (or already running)", "PullAccepted"),
            "400": error_ref("BadRequest"),
            "404": error_ref("NotFound"),
            "409": error_ref("Conflict"),
        })), "parameters", json!([model_name.clone(), { "name": "variant", "in": "query", "required": false,
            "description": "a quantized variant listed in the model's `variants` (q8_0, q6_k, q5_k_m, q4_k_m, q3_k_m for z-image-turbo); bf16 or absent: the release",
            "schema": { "type": "string" } }])) },
        "/api/models/{name}/pull/events": { "get": with(op("pull_events", "models", "Download progress (SSE)", json!({
            "200": sse("events `progress {file, index, count, bytes, total_bytes}`, then `done {path}` or `failed {error}`", &PULL_EVENTS),
            "404": error_ref("NotFound"),
        })), "parameters", json!([model_name])) },
        "/api/model": { "post": body(op("select_model", "models", "Switch models: new jobs run on `name`; the worker loads it between jobs (at once when idle)", json!({
            "200": { "description": "already loaded: `{name, state: \"loaded\"}`", "content": { "application/json": { "schema": { "type": "object" } } } },
            "202": { "description": "`{name, state: \"switching\" | \"after_queued\"}`; `GET /api/events` reports the switch", "content": { "application/json": { "schema": { "type": "object" } } } },
            "400": error_ref("BadRequest"), "409": error_ref("Conflict"), "415": error_ref("UnsupportedMediaType"), "422": error_ref("Invalid"), "503": error_ref("Unavailable"),
        })), "SelectModelRequest") },
        "/api/events": { "get": op("events", "models", "Server-wide events (SSE)", json!({
            "200": sse("`model {state, name, job?, family?, elapsed_ms?, error?}`: the model loaded now (or loading) first, then each switch — `loading`, then `loaded` or `failed` (the error names the file)", &SERVER_EVENTS),
        })) },
        "/api/enhance": { "post": body(op("enhance", "jobs", "Preview the prompt enhancement", json!({
            "200": ok("the enhanced texts and advice", "Enhanced"),
            "400": error_ref("BadRequest"), "413": error_ref("TooLarge"), "415": error_ref("UnsupportedMediaType"), "422": error_ref("Invalid"),
        })), "EnhanceRequest") },
        "/api/jobs": {
            "get": op("list_jobs", "jobs", "Queued, running and recent jobs, newest first", json!({ "200": ok("jobs", "JobList") })),
            "post": body(op("submit_job", "jobs", "Queue a generation", json!({
                "202": ok("accepted", "Accepted"),
                "400": error_ref("BadRequest"), "413": error_ref("TooLarge"), "415": error_ref("UnsupportedMediaType"),
                "422": error_ref("Invalid"), "429": error_ref("QueueFull"), "503": error_ref("Unavailable"),
                "507": error_ref("InsufficientStorage"),
            })), "GenerationRequest"),
            "delete": with(op("cancel_queued_jobs", "jobs", "Cancel every queued job at once (the running one goes on)", json!({
                "200": { "description": "`{cancelled: [ids]}`", "content": { "application/json": { "schema": { "type": "object", "properties": { "cancelled": { "type": "array", "items": { "type": "string" } } } } } } },
                "422": error_ref("Invalid"),
            })), "parameters", json!([{ "name": "state", "in": "query", "required": true, "description": "`queued`", "schema": { "type": "string", "enum": ["queued"] } }])),
        },
        "/api/history": { "get": with(op("history", "jobs", "Finished jobs (done or failed), newest first, a page at a time", json!({
            "200": ok("a page", "HistoryPage"), "422": error_ref("Invalid"),
        })), "parameters", json!([
            { "name": "q", "in": "query", "required": false, "description": "text the prompt contains (case-insensitive)", "schema": { "type": "string" } },
            { "name": "before", "in": "query", "required": false, "description": "`next_before` of the previous page", "schema": { "type": "integer", "format": "int64" } },
            { "name": "limit", "in": "query", "required": false, "description": "jobs per page (1-100, default 24)", "schema": { "type": "integer", "minimum": 1, "maximum": 100 } },
        ])) },
        "/api/history/{id}": { "delete": with(op("delete_history", "jobs", "Delete a finished job: its images, sidecar and record", json!({
            "204": { "description": "deleted" }, "404": error_ref("NotFound"), "409": error_ref("Conflict"),
        })), "parameters", json!([job_id.clone()])) },
        "/api/jobs/{id}": {
            "get": with(op("get_job", "jobs", "One job", json!({ "200": ok("the job", "Job"), "404": error_ref("NotFound") })), "parameters", json!([job_id.clone()])),
            "delete": with(op("cancel_job", "jobs", "Cancel a job (queued: at once; running: between steps)", json!({
                "200": ok("cancelled", "CancelResult"), "202": ok("stopping", "CancelResult"),
                "404": error_ref("NotFound"), "409": error_ref("Conflict"),
            })), "parameters", json!([job_id.clone()])),
        },
        "/api/jobs/{id}/events": { "get": with(op("job_events", "jobs", "A job's events (SSE)", json!({
            "200": sse("`queued {position}`, `started`, `progress {step,total,elapsed_ms}`, `model {state,name,error?,elapsed_ms?}` (the worker switches models for this job), `preview {step,image}` (a `data:image/png` URL, at most 256 px, unless `?preview=0` or the server runs with `--preview off`), `notice {kind,message}`, then `done {images, peak_memory_bytes?}`, `failed {error}` or `cancelled`", &JOB_EVENTS),
            "404": error_ref("NotFound"),
        })), "parameters", json!([job_id, { "name": "preview", "in": "query", "required": false, "description": "`0`: leave the live previews out of this stream", "schema": { "type": "string", "enum": ["0", "1"] } }])) },
        "/api/memory/stream": { "get": with(op("memory_stream", "server", "Memory samples (SSE): this server's, or with `worker` one remote worker's", json!({
            "200": sse("`sample {t_ms, device, used_bytes, total_bytes, rss_bytes?, job_id?, phase?, step?}`", &MEMORY_EVENTS),
            "404": error_ref("NotFound"),
        })), "parameters", json!([
            { "name": "worker", "in": "query", "required": false, "description": "a remote worker's name (see /api/workers); only with --broker", "schema": { "type": "string" } }
        ])) },
        "/api/workers": { "get": op("workers", "server", "The remote workers (with --broker): name, model, device, busy or idle", json!({ "200": ok("workers", "WorkerList") })) },
    });
    let openai = json!({
        "/v1/images/generations": { "post": body(op("openai_images_generations", "openai", "OpenAI Images API: create images", json!({
            "200": ok("the images", "OpenAiImagesResponse"),
            "400": error_ref("OpenAiBadRequest"), "409": error_ref("OpenAiCancelled"), "413": error_ref("OpenAiTooLarge"), "415": error_ref("OpenAiUnsupportedMediaType"),
            "429": error_ref("OpenAiRateLimited"), "500": error_ref("OpenAiServerError"), "503": error_ref("OpenAiUnavailable"),
            "504": error_ref("OpenAiTimeout"), "507": error_ref("OpenAiInsufficientStorage"),
        })), "OpenAiImagesRequest") },
        "/v1/images/edits": { "post": with(op("openai_images_edits", "openai", "OpenAI Images API: edit an image (image to image; inpainting where the mask is transparent)", json!({
            "200": ok("the images", "OpenAiImagesResponse"),
            "400": error_ref("OpenAiBadRequest"), "413": error_ref("OpenAiTooLarge"),
            "429": error_ref("OpenAiRateLimited"), "500": error_ref("OpenAiServerError"), "503": error_ref("OpenAiUnavailable"),
        })), "requestBody", json!({ "required": true, "content": { "multipart/form-data": { "schema": schema("OpenAiEditRequest") } } })) },
        "/v1/models": { "get": op("openai_models", "openai", "OpenAI models list: the loaded model and its aliases", json!({ "200": ok("models", "OpenAiModelList") })) },
        "/v1/models/{model}": { "get": with(op("openai_model", "openai", "One OpenAI model object", json!({
            "200": ok("the model", "OpenAiModel"), "404": error_ref("OpenAiNotFound"),
        })), "parameters", json!([path_param("model", "model id")])) },
    });
    let a1111 = json!({
        "/sdapi/v1/txt2img": { "post": body(op("a1111_txt2img", "a1111", "AUTOMATIC1111 txt2img", json!({
            "200": ok("the images", "A1111Txt2ImgResponse"),
            "413": error_ref("A1111Error"), "415": error_ref("A1111Error"), "422": error_ref("A1111Validation"),
            "429": error_ref("A1111Error"), "500": error_ref("A1111RunError"), "503": error_ref("A1111Error"),
            "504": error_ref("A1111Error"), "507": error_ref("A1111RunError"),
        })), "A1111Txt2ImgRequest") },
        "/sdapi/v1/img2img": { "post": body(op("a1111_img2img", "a1111", "AUTOMATIC1111 img2img (inpainting with `mask`)", json!({
            "200": ok("the images", "A1111Txt2ImgResponse"),
            "413": error_ref("A1111Error"), "415": error_ref("A1111Error"), "422": error_ref("A1111Validation"),
            "429": error_ref("A1111Error"), "500": error_ref("A1111RunError"), "503": error_ref("A1111Error"),
        })), "A1111Img2ImgRequest") },
        "/sdapi/v1/loras": { "get": op("a1111_loras", "a1111", "The LoRAs in <models-dir>/loras/ (names for `<lora:name:weight>` and the job API's `loras`)", json!({ "200": { "description": "LoRAs", "content": { "application/json": { "schema": { "type": "array", "items": schema("A1111Lora") } } } } })) },
        "/sdapi/v1/refresh-loras": { "post": op("a1111_refresh_loras", "a1111", "Nothing to do: the folder is read on every request", json!({ "200": { "description": "`null`", "content": { "application/json": { "schema": { "nullable": true } } } } })) },
        "/sdapi/v1/progress": { "get": op("a1111_progress", "a1111", "Progress of the running job", json!({ "200": ok("progress", "A1111Progress") })) },
        "/sdapi/v1/interrupt": { "post": op("a1111_interrupt", "a1111", "Stop the running job", json!({ "200": { "description": "`{}`", "content": { "application/json": { "schema": { "type": "object" } } } } })) },
        "/sdapi/v1/sd-models": { "get": op("a1111_sd_models", "a1111", "The models on this machine (switch with `POST /sdapi/v1/options`)", json!({ "200": { "description": "models", "content": { "application/json": { "schema": { "type": "array", "items": schema("A1111SdModel") } } } } })) },
        "/sdapi/v1/options": {
            "get": op("a1111_options", "a1111", "Settings clients read", json!({ "200": ok("options", "A1111Options") })),
            "post": body(op("a1111_set_options", "a1111", "`sd_model_checkpoint` switches models (answers once loaded); other options are logged and ignored", json!({
                "200": { "description": "`null`", "content": { "application/json": { "schema": { "nullable": true } } } },
                "413": error_ref("A1111Error"), "415": error_ref("A1111Error"), "422": error_ref("A1111Validation"),
                "500": error_ref("A1111Error"), "503": error_ref("A1111Error"),
            })), "A1111Options"),
        },
        "/sdapi/v1/samplers": { "get": op("a1111_samplers", "a1111", "The sampler the model runs", json!({ "200": { "description": "samplers", "content": { "application/json": { "schema": { "type": "array", "items": { "type": "object" } } } } } })) },
        "/sdapi/v1/schedulers": { "get": op("a1111_schedulers", "a1111", "Schedulers", json!({ "200": { "description": "schedulers", "content": { "application/json": { "schema": { "type": "array", "items": { "type": "object" } } } } } })) },
        "/sdapi/v1/scripts": { "get": op("a1111_scripts", "a1111", "Scripts (none)", json!({ "200": { "description": "scripts", "content": { "application/json": { "schema": { "type": "object" } } } } })) },
        "/controlnet/model_list": { "get": op("controlnet_model_list", "a1111", "The ControlNets in <models-dir>/controlnet/ (and a ComfyUI tree's models/controlnet/): names for `control.model` and the A1111 unit's `model`", json!({ "200": { "description": "ControlNets", "content": { "application/json": { "schema": { "type": "object", "properties": { "model_list": { "type": "array", "items": { "type": "string" } } } } } } } })) },
        "/controlnet/module_list": { "get": op("controlnet_module_list", "a1111", "The preprocessors built in (none, canny) and their sliders", json!({ "200": { "description": "preprocessors", "content": { "application/json": { "schema": { "type": "object", "properties": { "module_list": { "type": "array", "items": { "type": "string" } }, "module_detail": { "type": "object" } } } } } } })) },
        "/controlnet/detect": { "post": body(op("controlnet_detect", "a1111", "A preprocessor's map of each image (the UI's preview; the A1111 ControlNet extension's shape)", json!({ "200": { "description": "the maps, base64 PNG", "content": { "application/json": { "schema": { "type": "object", "properties": { "images": { "type": "array", "items": { "type": "string" } }, "info": { "type": "string" } } } } } }, "400": error_ref("BadRequest"), "422": error_ref("Invalid") })), "ControlNetDetectRequest") },
    });
    merge([ui, openai, a1111])
}

/// One object with the keys of all `parts`.
fn merge<const N: usize>(parts: [Value; N]) -> Value {
    let mut out = serde_json::Map::new();
    for p in parts {
        if let Value::Object(o) = p {
            out.extend(o);
        }
    }
    Value::Object(out)
}

fn error_response(description: &str, name: &str) -> Value {
    json!({ "description": description, "content": json_body(name) })
}

/// What the schemas depend on: the loaded model's size multiple and the device's batch limit.
#[derive(Debug, Clone)]
pub struct Facts {
    /// The loaded model's name (OpenAI's `model` accepts it and the aliases).
    pub model: String,
    pub size_multiple: u32,
    pub max_batch: u32,
}

/// A prompt: not blank, no control characters but tab and newlines (what validation accepts).
fn prompt_schema() -> Value {
    const OK: &str = r"[^\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f]";
    const VISIBLE: &str = r"[^\s\u0000-\u001f\u007f-\u009f]";
    json!({ "type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS,
            "pattern": format!("^{OK}*{VISIBLE}{OK}*$") })
}

/// `schema` that also accepts `null` (= the default, as every optional request field does).
fn nullable(mut schema: Value) -> Value {
    if let Some(o) = schema.as_object_mut() {
        o.insert("nullable".into(), Value::Bool(true));
    }
    schema
}

fn components(f: &Facts) -> Value {
    let modes: Vec<&str> = MemoryMode::ALL.iter().map(|m| m.as_str()).collect();
    let nullable_string = json!({ "type": "string", "nullable": true });
    let side = nullable(
        json!({ "type": "integer", "minimum": MIN_SIDE, "maximum": MAX_SIDE, "multipleOf": f.size_multiple,
        "description": format!("a multiple of the loaded model's size multiple ({})", f.size_multiple) }),
    );
    let batch = nullable(json!({ "type": "integer", "minimum": 1, "maximum": f.max_batch }));
    let text = json!({ "type": "string", "maxLength": MAX_PROMPT_CHARS, "nullable": true,
        "pattern": r"^[^\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f]*$" });
    let steps = nullable(json!({ "type": "integer", "minimum": MIN_STEPS, "maximum": MAX_STEPS }));
    let security = json!({
            "bearer": { "type": "http", "scheme": "bearer", "description": "the key given to `zturbo serve --api-key` (only when one is set)" },
            "basic": { "type": "http", "scheme": "basic", "description": "any user name, the API key as the password (A1111 clients)" },
            "cookie": { "type": "apiKey", "in": "cookie", "name": super::security::COOKIE, "description": "set by POST /api/auth for the browser UI" },
    });
    let responses = json!({
            "BadRequest": error_response("malformed JSON", "Error"),
            "Invalid": error_response("an invalid value; `field` names it", "Error"),
            "TooLarge": error_response("body over 16 MiB", "Error"),
            "UnsupportedMediaType": error_response("not application/json", "Error"),
            "NotFound": error_response("no such thing", "Error"),
            "Conflict": error_response("not in a state that allows it", "Error"),
            "QueueFull": { "description": "the queue is full", "headers": { "Retry-After": { "schema": { "type": "integer" } } }, "content": json_body("Error") },
            "Unavailable": error_response("shutting down, or the outputs folder cannot be written", "Error"),
            "InsufficientStorage": error_response("the outputs folder's disk is full", "Error"),
            "TooManyGuesses": { "description": "too many wrong API keys from this address", "headers": { "Retry-After": { "schema": { "type": "integer" } } }, "content": json_body("Error") },
            "Unauthorized": error_response("an API key is required", "Error"),
            "Forbidden": error_response("Host not loopback, or a cross-origin state-changing request", "Error"),
            "OpenAiBadRequest": error_response("invalid request; `param` names the field", "OpenAiError"),
            "OpenAiTooLarge": error_response("body over 16 MiB", "OpenAiError"),
            "OpenAiUnsupportedMediaType": error_response("not application/json", "OpenAiError"),
            "OpenAiNotFound": error_response("no such model", "OpenAiError"),
            "OpenAiRateLimited": { "description": "the queue is full", "headers": { "Retry-After": { "schema": { "type": "integer" } } }, "content": json_body("OpenAiError") },
            "OpenAiServerError": error_response("the generation failed", "OpenAiError"),
            "OpenAiUnavailable": error_response("shutting down, or the outputs folder cannot be written", "OpenAiError"),
            "OpenAiCancelled": error_response("the job was cancelled by another client (`code` job_cancelled; `x-should-retry: false`)", "OpenAiError"),
            "OpenAiTimeout": error_response("no answer within --sync-timeout (`code` timeout; `x-should-retry: false`)", "OpenAiError"),
            "OpenAiInsufficientStorage": error_response("the outputs folder's disk is full", "OpenAiError"),
            "OpenAiTooManyGuesses": { "description": "too many wrong API keys from this address", "headers": { "Retry-After": { "schema": { "type": "integer" } } }, "content": json_body("OpenAiError") },
            "OpenAiUnauthorized": error_response("an API key is required", "OpenAiError"),
            "OpenAiForbidden": error_response("Host not loopback, or cross-origin", "OpenAiError"),
            "A1111Error": error_response("`{detail}`", "A1111Detail"),
            "A1111Validation": error_response("FastAPI validation error", "A1111ValidationError"),
            "A1111RunError": error_response("the generation failed", "A1111RunError"),
            "A1111Unauthorized": error_response("an API key is required", "A1111Detail"),
            "A1111Forbidden": error_response("Host not loopback, or cross-origin", "A1111Detail"),
            "A1111TooManyGuesses": { "description": "too many wrong API keys from this address", "headers": { "Retry-After": { "schema": { "type": "integer" } } }, "content": json_body("A1111Detail") },
    });
    let core = json!({
            "Error": { "type": "object", "required": ["error"], "properties": { "error": {
                "type": "object", "required": ["field", "message"],
                "properties": { "field": nullable_string.clone(), "message": { "type": "string" },
                    "i18n": schema("Translations") } } } },
            "Translations": { "type": "object", "description": "The English text beside it in the page's other languages (absent when the server has none)",
                "properties": { "zh-CN": { "type": "string", "description": "Simplified Chinese" } } },
            "Advice": { "type": "object", "required": ["kind", "level", "message"], "properties": {
                "kind": { "type": "string", "enum": crate::prompt::ADVICE_KINDS }, "level": { "type": "string", "enum": ["info", "warn"] },
                "message": { "type": "string" }, "i18n": schema("Translations") } },
            "GenerationRequest": { "type": "object", "required": ["prompt"], "additionalProperties": false, "properties": {
                "prompt": prompt_schema(),
                "negative_prompt": text.clone(),
                "width": side.clone(), "height": side.clone(), "steps": steps.clone(),
                "cfg": { "type": "number", "minimum": MIN_CFG, "maximum": MAX_CFG, "nullable": true, "description": "1.0 = guidance off; ≥ 3 is clamped to the model's safe maximum" },
                "seed": { "type": "integer", "minimum": 0, "maximum": u64::MAX, "nullable": true },
                "batch": batch.clone(),
                "enhance": { "type": "boolean", "nullable": true },
                "memory_mode": { "type": "string", "enum": modes, "nullable": true },
                "model": { "type": "string", "nullable": true, "description": "a local model (`GET /api/models`) to run on; the selected one when absent — the worker switches between jobs" },
                "enhance_exclude": { "type": "array", "maxItems": MAX_EXCLUDED_PHRASES, "items": { "type": "string", "maxLength": MAX_EXCLUDE_CHARS }, "description": "added phrases the enhancement leaves out (removed from the preview)" },
            } },
            "Accepted": { "type": "object", "required": ["id", "position"], "properties": { "id": { "type": "string" }, "position": { "type": "integer" } } },
            "CancelResult": { "type": "object", "properties": { "id": { "type": "string" }, "state": { "type": "string", "enum": ["cancelled", "cancelling"] } } },
            "Job": { "type": "object", "required": ["id", "state", "step", "total_steps", "created_at", "params", "images", "notices"], "properties": {
                "id": { "type": "string" },
                "state": { "type": "string", "enum": ["queued", "running", "done", "failed", "cancelled"] },
                "position": { "type": "integer" },
                "step": { "type": "integer" }, "total_steps": { "type": "integer" },
                "created_at": { "type": "integer", "format": "int64" },
                "started_at": { "type": "integer", "format": "int64", "nullable": true },
                "finished_at": { "type": "integer", "format": "int64", "nullable": true },
                "params": { "type": "object", "description": "as resolved after the run (final prompts, seed, cfg used, cfg_requested); before it, the validated request" },
                "enhancement": { "type": "object", "nullable": true },
                "seq": { "type": "integer", "format": "int64", "description": "acceptance order" },
                "images": { "type": "array", "items": { "type": "string" } },
                "image_seeds": { "type": "array", "items": { "type": "integer", "format": "int64" }, "description": "each image's own seed" },
                "notices": { "type": "array", "items": schema("Notice") },
                "timings": { "type": "object", "nullable": true },
                "peak_memory_bytes": { "type": "integer", "format": "int64", "nullable": true },
                "error": nullable_string.clone(),
                "error_kind": { "type": "string", "nullable": true,
                    "enum": FailureKind::ALL,
                    "description": "what kind of failure `error` is (null unless the job failed)" },
                "worker": { "type": "string", "description": "with --broker: the worker that ran it" },
            } },
            "JobList": { "type": "object", "required": ["jobs"], "properties": { "jobs": { "type": "array", "items": schema("Job") } } },
            "HistoryPage": { "type": "object", "required": ["jobs", "next_before"], "properties": {
                "jobs": { "type": "array", "items": schema("Job") },
                "next_before": { "type": "integer", "format": "int64", "nullable": true, "description": "`before` of the next page; null on the last" } } },
            "Notice": { "type": "object", "required": ["kind", "message"], "properties": {
                "kind": { "type": "string", "enum": NoticeKind::ALL }, "message": { "type": "string" }, "step": { "type": "integer" },
                "from": { "type": "number" }, "to": { "type": "number" }, "component": { "type": "string" },
                "i18n": schema("Translations") } },
            "SelectModelRequest": { "type": "object", "required": ["name"], "additionalProperties": false, "properties": {
                "name": { "type": "string", "description": "a model `GET /api/models` lists as loaded or on disk" } } },
            "EnhanceRequest": { "type": "object", "required": ["prompt"], "additionalProperties": false, "properties": {
                "prompt": { "type": "string", "maxLength": MAX_PROMPT_CHARS },
                "negative_prompt": { "type": "string", "maxLength": MAX_PROMPT_CHARS, "nullable": true },
                "cfg": { "type": "number", "minimum": MIN_CFG, "maximum": MAX_CFG, "nullable": true, "description": "the form's CFG (the model's default when absent)" },
                "steps": steps.clone(),
                "exclude": { "type": "array", "maxItems": MAX_EXCLUDED_PHRASES, "items": { "type": "string", "maxLength": MAX_EXCLUDE_CHARS } } } },
            "Enhanced": { "type": "object", "properties": {
                "prompt": { "type": "string" }, "negative_prompt": { "type": "string" },
                "original_prompt": { "type": "string" }, "original_negative_prompt": nullable_string.clone(),
                "added": { "type": "object" }, "advice": { "type": "array", "items": schema("Advice") },
                "enhanced": { "type": "boolean" }, "recognised": { "type": "object" } } },
            "WorkerList": { "type": "object", "required": ["broker", "workers"], "properties": {
                "broker": { "type": "boolean", "description": "whether this server is a front door (--broker)" },
                "workers": { "type": "array", "items": schema("Worker") } } },
            "Worker": { "type": "object", "required": ["name", "model", "device", "state"], "properties": {
                "name": { "type": "string" }, "model": { "type": "string" }, "device": { "type": "string" },
                "device_name": { "type": "string" }, "total_bytes": { "type": "integer", "format": "int64" },
                "state": { "type": "string", "enum": ["busy", "idle"] }, "job": nullable_string.clone(),
                "step": { "type": "integer" }, "total_steps": { "type": "integer" },
                "seen_at": { "type": "integer", "format": "int64" } } },
            "Health": { "type": "object", "required": ["status", "model", "device"], "properties": {
                "status": { "type": "string", "enum": ["ok", "degraded"] }, "model": { "type": "string" }, "device": { "type": "string" },
                "reason": { "type": "string", "description": "when degraded: why new jobs would fail (the outputs folder is read-only, full, or a write just failed; with --broker, the broker cannot be reached)" },
                "workers": { "type": "integer", "description": "with --broker: live workers" } } },
            "EmptyEvent": { "type": "object", "additionalProperties": false },
            "JobQueuedEvent": { "type": "object", "required": ["position"], "properties": { "position": { "type": "integer", "minimum": 0 } } },
            "JobProgressEvent": { "type": "object", "required": ["step", "total", "elapsed_ms"], "properties": {
                "step": { "type": "integer" }, "total": { "type": "integer" }, "elapsed_ms": { "type": "integer", "format": "int64" } } },
            "JobDoneEvent": { "type": "object", "required": ["images"], "properties": { "images": { "type": "array", "items": { "type": "string" } },
                "peak_memory_bytes": { "type": "integer", "format": "int64", "nullable": true, "description": "the job's exact memory high-water mark (as in the record)" } } },
            "PullProgressEvent": { "type": "object", "required": ["file", "index", "count", "bytes"], "properties": {
                "file": { "type": "string" }, "index": { "type": "integer" }, "count": { "type": "integer" },
                "bytes": { "type": "integer", "format": "int64" }, "total_bytes": { "type": "integer", "format": "int64", "nullable": true } } },
            "PullDoneEvent": { "type": "object", "required": ["path"], "properties": { "path": { "type": "string" } } },
            "PullFailedEvent": { "type": "object", "required": ["error"], "properties": { "error": { "type": "string" } } },
            "MemorySample": { "type": "object", "required": ["t_ms", "device", "used_bytes", "total_bytes"], "properties": {
                "t_ms": { "type": "integer", "format": "int64" }, "device": { "type": "string" },
                "used_bytes": { "type": "integer", "format": "int64" }, "total_bytes": { "type": "integer", "format": "int64" },
                "rss_bytes": { "type": "integer", "format": "int64" }, "job_id": { "type": "string" },
                "phase": { "type": "string" }, "step": { "type": "integer" } } },
            "Info": { "type": "object", "properties": { "version": { "type": "string" }, "model": schema("InfoModel"), "device": { "type": "object" },
                "max_batch": { "type": "integer" }, "queue_size": { "type": "integer" }, "memory_modes": { "type": "array", "items": { "type": "string" } },
                "demo_help": nullable_string.clone() } },
            "InfoModel": { "type": "object", "properties": {
                "name": { "type": "string" }, "family": schema("Family"), "demo": { "type": "boolean" },
                "description": { "type": "string" }, "defaults": { "type": "object" }, "limits": { "type": "object" },
                "safe_cfg_max": { "type": "number" }, "size_multiple": { "type": "integer" },
                "profile": schema("Profile"),
                "files": { "type": "object", "description": "component weights loaded from single files (--transformer, --text-encoder, --vae); null: from the model folder",
                    "properties": { "transformer": nullable_string.clone(), "text_encoder": nullable_string.clone(), "vae": nullable_string.clone() } } } },
            "Family": { "type": "string", "enum": FamilyKind::ALL.iter().map(|f| f.as_str()).collect::<Vec<_>>() },
            "Profile": { "type": "object", "required": ["family", "steps", "cfg"],
                "description": "The loaded family's presets and bands: the UI draws its step and CFG presets and hints from them",
                "properties": {
                    "family": schema("Family"),
                    "steps": { "type": "object", "required": ["presets", "bands"], "properties": {
                        "presets": { "type": "array", "items": { "type": "integer" } },
                        "bands": { "type": "array", "items": schema("Band") } } },
                    "cfg": { "type": "object", "required": ["presets", "intercept_at", "bands"], "properties": {
                        "presets": { "type": "array", "items": { "type": "number" } },
                        "intercept_at": { "type": "number", "description": "requests from this CFG up are clamped to safe_cfg_max" },
                        "bands": { "type": "array", "items": schema("Band") } } } } },
            "Band": { "type": "object", "required": ["max", "level", "hint", "advice", "i18n"],
                "description": "A value falls in the first band whose max is ≥ the value (max null: unbounded). Texts may hold {value} (the value), {default} (model.defaults.steps or model.defaults.cfg, whichever ladder the band is in) and {safe} (model.safe_cfg_max)",
                "properties": {
                    "max": { "type": "number", "nullable": true, "description": "null: unbounded (the last band)" },
                    "level": { "type": "string", "enum": ["info", "ok", "warn", "bad"] },
                    "hint": { "type": "string", "description": "the form's short hint" },
                    "advice": { "type": "string", "description": "the prompt advice's sentence" },
                    "i18n": { "type": "object", "description": "the two texts in the page's other languages, with the same placeholders",
                        "properties": { "zh-CN": { "type": "object", "required": ["hint", "advice"], "properties": {
                            "hint": { "type": "string" }, "advice": { "type": "string" } } } } } } },
            "AuthRequest": { "type": "object", "required": ["key"], "additionalProperties": false, "properties": { "key": { "type": "string" } } },
            "AuthStatus": { "type": "object", "properties": { "required": { "type": "boolean" }, "authorized": { "type": "boolean" } } },
            "ModelListing": { "type": "object", "properties": {
                "name": { "type": "string" }, "family": { "type": "string" }, "repo": nullable_string.clone(),
                "state": { "type": "string", "enum": ["loaded", "on_disk", "not_downloaded"] },
                "size_bytes": { "type": "integer", "format": "int64", "nullable": true }, "demo": { "type": "boolean" },
                "path": nullable_string.clone(), "defaults": { "type": "object", "nullable": true }, "description": { "type": "string" },
                "variants": { "type": "array", "items": schema("ModelVariant"), "description": "catalog models with GGUF variants: the bf16 release and each variant (absent otherwise)" } } },
            "ModelVariant": { "type": "object", "properties": {
                "name": { "type": "string", "description": "bf16, q8_0, q6_k, q5_k_m, q4_k_m, q3_k_m" },
                "transformer_repo": { "type": "string" }, "text_encoder_repo": { "type": "string" },
                "size_bytes": { "type": "integer", "format": "int64", "description": "transformer + text encoder + VAE: the files when on disk, else estimated from the real tensor shapes" },
                "estimated": { "type": "boolean" }, "on_disk": { "type": "boolean" },
                "smallest_card_gib": { "type": "integer", "nullable": true, "description": "the smallest GPU (GiB; 400 MiB taken by the driver) on which the planner fits a 1024² job with CFG" },
                "smallest_card_mode": { "type": "string", "enum": ["performance", "balanced", "low"], "nullable": true },
                "pull": { "type": "string", "description": "the command that downloads it" } } },
            "WeightFile": { "type": "object", "description": "a single weight file in --models-dir or the --comfyui-dir tree (only files of a component zturbo runs)",
                "properties": {
                "name": { "type": "string" }, "path": { "type": "string" },
                "source": { "type": "string", "enum": ["models_dir", "comfyui"] },
                "role": { "type": "string", "enum": ["transformer", "text_encoder", "vae"] },
                "family": schema("Family"),
                "kind": { "type": "string", "description": "the naming it uses, e.g. `ComfyUI transformer`, `llama.cpp Qwen3`, `ldm/Flux VAE`" },
                "container": { "type": "string", "enum": ["safetensors", "gguf"] },
                "encoding": { "type": "string", "description": "the encoding of most of its bytes: bf16, f16, f32, float8_e4m3fn, float8_e5m2, q8_0, q6_k, q5_k, q4_k, q4_0 …" },
                "encodings": { "type": "object", "additionalProperties": { "type": "integer" }, "description": "tensor count per encoding" },
                "file_bytes": { "type": "integer", "format": "int64" },
                "loaded": { "type": "boolean", "description": "in use by the loaded model" },
                "flag": { "type": "string", "enum": ["--transformer", "--text-encoder", "--vae"], "description": "the serve/generate flag that loads it" } } },
            "ModelList": { "type": "object", "properties": { "models": { "type": "array", "items": schema("ModelListing") },
                "files": { "type": "array", "items": schema("WeightFile") },
                "pull": { "type": "object", "nullable": true, "description": "the running download: {name, progress}" } } },
            "PullAccepted": { "type": "object", "properties": { "name": { "type": "string" }, "repo": { "type": "string" }, "state": { "type": "string" }, "events": { "type": "string" } } },
    });
    // Image-to-image, inpainting and LoRA fields (kept apart: one json! this size overflows the
    // macro's recursion limit).
    let img2img_props = json!({
                "image": { "type": "string", "nullable": true, "description": "image to image: a PNG, JPEG or WebP as base64 or a data: URL (at most 10 MiB decoded, 8192 px a side, 16 Mpx); without width/height the job takes its size (rounded down to the size multiple)" },
                "mask": { "type": "string", "nullable": true, "description": "inpainting: a mask of the image's size, white (≥ 128) = repaint; base64 or a data: URL" },
                "strength": { "type": "number", "minimum": 0, "maximum": 1, "nullable": true, "description": "how much of the image is repainted (default: the model's image-to-image strength, 1 with a mask); the model must run at least one step (SD-Turbo: steps × strength ≥ 1)" },
                "mask_blur": { "type": "integer", "minimum": 0, "maximum": crate::request::MAX_MASK_BLUR, "nullable": true, "description": "σ in pixels of the blur that blends the original back outside the mask (default 4)" },
                "resize_mode": { "type": "string", "enum": ["stretch", "crop_and_resize", "resize_and_fill"], "nullable": true, "description": "how image and mask are fitted to width×height when their size differs" },
                "inpaint_fill": { "type": "string", "enum": ["original", "fill", "latent_noise", "latent_nothing"], "nullable": true, "description": "inpainting: what the masked region starts from (default original)" },
                "inpaint_full_res": { "type": "boolean", "nullable": true, "description": "inpainting: repaint only the masked region, cropped and scaled to width×height, then pasted back (default false)" },
                "inpaint_full_res_padding": { "type": "integer", "minimum": 0, "maximum": crate::request::MAX_INPAINT_PADDING, "nullable": true, "description": "pixels of context around the mask with inpaint_full_res" },
                "loras": { "type": "array", "nullable": true, "maxItems": crate::request::MAX_LORAS, "description": "LoRAs from <models-dir>/loras/ (see GET /sdapi/v1/loras), applied in order; `<lora:name:weight>` in the prompt adds more (A1111 syntax)",
                    "items": { "type": "object", "required": ["name"], "additionalProperties": false, "properties": {
                        "name": { "type": "string", "description": "file name without .safetensors" },
                        "weight": { "type": "number", "minimum": -crate::request::MAX_LORA_WEIGHT, "maximum": crate::request::MAX_LORA_WEIGHT, "default": 1.0 } } } },
    });
    // ControlNet (kept apart for the same reason).
    let control_props = json!({
                "control": { "type": "object", "nullable": true, "required": ["image"], "additionalProperties": false,
                    "description": "ControlNet (Z-Image): a control image guides the layout; with image + mask, the ControlNet's inpainting channels (2.0/2.1)", "properties": {
                    "model": { "type": "string", "nullable": true, "description": "a name from GET /controlnet/model_list (default: the only one)" },
                    "image": { "type": "string", "description": "the control image (edges, depth, pose …), base64 or a data: URL; fitted to width×height" },
                    "scale": { "type": "number", "minimum": 0, "maximum": crate::request::MAX_CONTROL_SCALE, "nullable": true, "default": crate::request::CONTROL_SCALE },
                    "preprocess": { "type": "string", "enum": ["none", "canny"], "nullable": true, "description": "none: the image is the map (default)" },
                    "start": { "type": "number", "minimum": 0, "maximum": 1, "nullable": true, "description": "fraction of the steps where control starts (default 0); must be below end" },
                    "end": { "type": "number", "minimum": 0, "maximum": 1, "nullable": true, "description": "fraction of the steps where control ends (default 1)" },
                    "low_threshold": { "type": "integer", "minimum": 0, "maximum": 1020, "nullable": true, "default": crate::control::CANNY_LOW },
                    "high_threshold": { "type": "integer", "minimum": 0, "maximum": 1020, "nullable": true, "default": crate::control::CANNY_HIGH } } },
    });
    let mut core = core;
    if let (Some(props), Value::Object(more)) = (
        core.pointer_mut("/GenerationRequest/properties")
            .and_then(Value::as_object_mut),
        control_props,
    ) {
        props.extend(more);
    }
    if let Value::Object(schemas) = &mut core {
        schemas.insert(
            "ControlNetDetectRequest".into(),
            json!({ "type": "object", "required": ["controlnet_input_images"], "properties": {
                "controlnet_module": { "type": "string", "enum": ["none", "canny"], "nullable": true },
                "controlnet_input_images": { "type": "array", "minItems": 1, "maxItems": 4, "items": { "type": "string", "description": "base64 PNG/JPEG/WebP or a data: URL" } },
                "controlnet_threshold_a": { "type": "number", "nullable": true, "description": "canny's low threshold (default 100)" },
                "controlnet_threshold_b": { "type": "number", "nullable": true, "description": "canny's high threshold (default 200)" } } }),
        );
    }
    if let (Some(props), Value::Object(more)) = (
        core.pointer_mut("/GenerationRequest/properties")
            .and_then(Value::as_object_mut),
        img2img_props,
    ) {
        props.extend(more);
    }
    let openai = json!({
            "OpenAiError": { "type": "object", "required": ["error"], "properties": { "error": {
                "type": "object", "required": ["message", "type", "param", "code"],
                "properties": { "message": { "type": "string" }, "type": { "type": "string" }, "param": nullable_string.clone(), "code": nullable_string.clone() } } } },
            "OpenAiImagesRequest": { "type": "object", "required": ["prompt"], "properties": {
                "prompt": prompt_schema(),
                "model": { "type": "string", "nullable": true,
                    "enum": std::iter::once(f.model.as_str()).chain(super::openai::ALIASES).collect::<Vec<_>>(),
                    "description": "the loaded model's name or an alias (also any gpt-image-* name); all run the loaded model" },
                "n": { "type": "integer", "minimum": 1, "maximum": f.max_batch, "nullable": true },
                "size": { "type": "string", "nullable": true,
                    "enum": ["auto", "256x256", "512x512", "1024x1024", "1792x1024", "1024x1792", "1536x1024", "1024x1536"],
                    "description": "these, or any WIDTHxHEIGHT the model accepts (see GenerationRequest's width and height)" },
                "response_format": { "type": "string", "enum": ["b64_json", "url"], "nullable": true },
                "quality": { "type": "string", "enum": ["standard", "hd", "auto", "low", "medium", "high", "xhigh", "max"], "nullable": true },
                "style": { "type": "string", "description": "ignored", "nullable": true },
                "user": { "type": "string", "description": "ignored", "nullable": true },
                "output_format": { "type": "string", "enum": ["png"], "nullable": true },
                "stream": { "type": "boolean", "enum": [false], "nullable": true } } },
            "OpenAiEditRequest": { "type": "object", "required": ["image", "prompt"], "properties": {
                "image": { "type": "string", "format": "binary", "description": "PNG, JPEG or WebP (also as `image[]`); without `size` the result has its size" },
                "mask": { "type": "string", "format": "binary", "description": "PNG of the image's size: fully transparent pixels are edited, the rest kept (pasted back). Without a mask an image with transparent pixels is its own mask; an opaque image is edited as a whole" },
                "prompt": { "type": "string", "maxLength": MAX_PROMPT_CHARS },
                "model": { "type": "string", "description": "as for generations" },
                "n": { "type": "integer", "minimum": 1, "maximum": f.max_batch },
                "size": { "type": "string", "description": "WIDTHxHEIGHT or auto" },
                "response_format": { "type": "string", "enum": ["b64_json", "url"] },
                "quality": { "type": "string", "enum": ["standard", "hd", "auto", "low", "medium", "high", "xhigh", "max"] },
                "output_format": { "type": "string", "enum": ["png"] },
                "user": { "type": "string", "description": "ignored" } } },
            "OpenAiImage": { "type": "object", "properties": { "b64_json": { "type": "string" }, "url": { "type": "string" }, "revised_prompt": { "type": "string" } } },
            "OpenAiImagesResponse": { "type": "object", "required": ["created", "data"], "properties": {
                "created": { "type": "integer", "format": "int64" }, "data": { "type": "array", "items": schema("OpenAiImage") } } },
            "OpenAiModel": { "type": "object", "required": ["id", "object", "created", "owned_by"], "properties": {
                "id": { "type": "string" }, "object": { "type": "string", "enum": ["model"] }, "created": { "type": "integer", "format": "int64" }, "owned_by": { "type": "string" } } },
            "OpenAiModelList": { "type": "object", "required": ["object", "data"], "properties": {
                "object": { "type": "string", "enum": ["list"] }, "data": { "type": "array", "items": schema("OpenAiModel") } } },
    });
    let a1111 = json!({
            "A1111Detail": { "type": "object", "required": ["detail"], "properties": { "detail": { "type": "string" } } },
            "A1111ValidationError": { "type": "object", "required": ["detail"], "properties": { "detail": { "type": "array", "items": {
                "type": "object", "required": ["loc", "msg", "type"], "properties": {
                    "loc": { "type": "array", "items": { "type": "string" } }, "msg": { "type": "string" }, "type": { "type": "string" } } } } } },
            "A1111RunError": { "type": "object", "properties": { "error": { "type": "string" }, "detail": { "type": "string" }, "body": { "type": "string" }, "errors": { "type": "string" } } },
            "A1111Txt2ImgRequest": { "type": "object", "additionalProperties": true, "required": ["prompt"],
                "description": "A1111's txt2img body; fields not listed (sampler_name, scheduler, override_settings, alwayson_scripts other than controlnet, …) are ignored", "properties": {
                "prompt": prompt_schema(), "negative_prompt": text,
                "width": side.clone(), "height": side,
                "steps": steps, "cfg_scale": { "type": "number", "minimum": MIN_CFG, "maximum": MAX_CFG, "nullable": true },
                "seed": { "type": "integer", "format": "int64", "description": "-1 = random", "nullable": true },
                "batch_size": batch,
                "n_iter": { "type": "integer", "minimum": 1, "maximum": super::a1111::MAX_N_ITER, "nullable": true },
                "alwayson_scripts": { "type": "object", "nullable": true, "description": "only `controlnet.args` is read: the ControlNet extension's units (image, module none|canny, model, weight, guidance_start, guidance_end, threshold_a/b, enabled); one enabled unit per job" } } },
            "A1111Img2ImgRequest": { "type": "object", "additionalProperties": true, "required": ["init_images"],
                "description": "A1111's img2img body: the txt2img fields plus these; A1111's defaults apply (denoising_strength 0.75, mask_blur 4, inpainting_fill 0, inpaint_full_res true, inpaint_full_res_padding 0, resize_mode 0)", "properties": {
                "prompt": prompt_schema(), "negative_prompt": { "type": "string", "nullable": true },
                "width": { "type": "integer", "nullable": true }, "height": { "type": "integer", "nullable": true },
                "steps": { "type": "integer", "nullable": true }, "cfg_scale": { "type": "number", "nullable": true },
                "seed": { "type": "integer", "format": "int64", "description": "-1 = random", "nullable": true },
                "batch_size": { "type": "integer", "nullable": true },
                "n_iter": { "type": "integer", "minimum": 1, "maximum": super::a1111::MAX_N_ITER, "nullable": true },
                "init_images": { "type": "array", "minItems": 1, "maxItems": 1, "items": { "type": "string", "description": "base64 PNG/JPEG/WebP or a data: URL" } },
                "mask": { "type": "string", "nullable": true, "description": "base64 mask of the image's size, white = repaint" },
                "denoising_strength": { "type": "number", "minimum": 0, "maximum": 1, "nullable": true },
                "mask_blur": { "type": "integer", "minimum": 0, "maximum": crate::request::MAX_MASK_BLUR, "nullable": true },
                "inpainting_mask_invert": { "type": "integer", "enum": [0, 1], "nullable": true },
                "inpainting_fill": { "type": "integer", "enum": [0, 1, 2, 3], "nullable": true, "description": "0 fill, 1 original, 2 latent noise, 3 latent nothing" },
                "inpaint_full_res": { "type": "boolean", "nullable": true, "description": "true: only the masked region (cropped, scaled to width×height, pasted back)" },
                "inpaint_full_res_padding": { "type": "integer", "minimum": 0, "maximum": crate::request::MAX_INPAINT_PADDING, "nullable": true },
                "resize_mode": { "type": "integer", "enum": [0, 1, 2, 3], "nullable": true, "description": "0 just resize, 1 crop and resize, 2 resize and fill, 3 just resize" },
                "include_init_images": { "type": "boolean", "nullable": true } } },
            "A1111Lora": { "type": "object", "required": ["name", "path"], "properties": {
                "name": { "type": "string" }, "alias": { "type": "string" }, "path": { "type": "string" },
                "size_bytes": { "type": "integer", "format": "int64" }, "metadata": { "type": "object" } } },
            "A1111Txt2ImgResponse": { "type": "object", "required": ["images", "parameters", "info"], "properties": {
                "images": { "type": "array", "items": { "type": "string", "format": "byte" } },
                "parameters": { "type": "object" },
                "info": { "type": "string", "description": "JSON text: prompt, all_prompts, seed, all_seeds, infotexts, …" } } },
            "A1111Progress": { "type": "object", "properties": {
                "progress": { "type": "number" }, "eta_relative": { "type": "number" }, "state": { "type": "object" },
                "current_image": nullable_string.clone(), "textinfo": nullable_string } },
            "A1111SdModel": { "type": "object", "properties": {
                "title": { "type": "string" }, "model_name": { "type": "string" }, "hash": { "type": "string", "nullable": true },
                "sha256": { "type": "string", "nullable": true }, "filename": { "type": "string" }, "config": { "type": "string", "nullable": true } } },
            "A1111Options": { "type": "object", "additionalProperties": true, "properties": { "sd_model_checkpoint": { "type": "string" } } },
    });
    // Events of the UI lane (model switches, live previews).
    let events = json!({
            "JobModelEvent": { "type": "object", "required": ["state", "name"], "properties": {
                "state": { "type": "string", "enum": ["loading", "loaded", "failed"] }, "name": { "type": "string" },
                "error": { "type": "string", "nullable": true, "description": "when failed: names the file at fault" },
                "elapsed_ms": { "type": "integer", "format": "int64", "nullable": true } } },
            "JobPreviewEvent": { "type": "object", "required": ["step", "image"], "properties": {
                "step": { "type": "integer" }, "image": { "type": "string", "description": "a `data:image/png;base64,` URL, at most 256 px on the long side" } } },
            "ModelSwitchEvent": { "type": "object", "required": ["state", "name"], "properties": {
                "state": { "type": "string", "enum": ["loading", "loaded", "failed"] }, "name": { "type": "string" },
                "job": { "type": "string", "nullable": true, "description": "the job the switch is for, if any" },
                "family": { "type": "string" }, "elapsed_ms": { "type": "integer", "format": "int64" },
                "error": { "type": "string", "description": "when failed: names the file at fault" } } },
    });
    json!({
        "securitySchemes": security,
        "responses": responses,
        "schemas": merge([core, events, openai, a1111]),
    })
}

/// A nullable schema with an `enum` must list `null` in it too (OpenAPI 3.0.3's clarification).
fn null_in_enums(v: &mut Value) {
    match v {
        Value::Object(o) => {
            if o.get("nullable") == Some(&Value::Bool(true)) {
                if let Some(Value::Array(e)) = o.get_mut("enum") {
                    if !e.contains(&Value::Null) {
                        e.push(Value::Null);
                    }
                }
            }
            o.values_mut().for_each(null_in_enums);
        }
        Value::Array(a) => a.iter_mut().for_each(null_in_enums),
        _ => {}
    }
}

/// The whole document, for the loaded model.
pub fn spec(f: &Facts) -> Value {
    let mut components = components(f);
    null_in_enums(&mut components);
    json!({
            "openapi": "3.0.3",
            "info": {
                "title": "zturbo",
                "version": env!("CARGO_PKG_VERSION"),
                "description": "Local image generation with Turbo diffusion models: the UI's job API, the OpenAI Images API and the AUTOMATIC1111 API, all through one queue. With `--api-key`, every /api, /v1, /sdapi and /images call needs the key.",
            },
            "tags": [
                { "name": "ui" }, { "name": "meta" }, { "name": "images" }, { "name": "server" },
                { "name": "models" }, { "name": "jobs" }, { "name": "openai" }, { "name": "a1111" },
            ],
            "security": [{}, { "bearer": [] }, { "basic": [] }, { "cookie": [] }],
            "paths": paths(),
            "components": components,
    })
}

/// `GET /openapi.json`.
pub async fn document(State(s): State<super::AppState>) -> Response {
    let facts = Facts {
        model: s.info().model.clone(),
        size_multiple: s.info().profile.size_multiple,
        max_batch: s.info().limits.max_batch,
    };
    (
        [(header::CONTENT_TYPE, "application/json")],
        axum::Json(spec(&facts)),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn facts() -> Facts {
        Facts {
            model: "demo".into(),
            size_multiple: 16,
            max_batch: 4,
        }
    }

    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(o) => {
                if let Some(Value::String(r)) = o.get("$ref") {
                    out.push(r.clone());
                }
                o.values().for_each(|x| refs(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }

    #[test]
    fn documents_exactly_the_routers_routes() {
        let doc = &spec(&facts());
        let documented: BTreeSet<(String, String)> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, item)| {
                item.as_object()
                    .unwrap()
                    .keys()
                    .filter(|k| *k != "parameters")
                    .map(move |m| (path.clone(), m.clone()))
            })
            .collect();
        let routed: BTreeSet<(String, String)> = crate::server::routes()
            .iter()
            .map(|r| (r.path.to_string(), r.verb.as_str().to_string()))
            .collect();
        assert_eq!(documented, routed);
    }

    #[test]
    fn event_streams_describe_each_event() {
        // Schemathesis (and OpenAPI 3.2's itemSchema) read an event stream's schema as the
        // schema of one parsed event, `{event, data, id?, retry?}`: a bare string fails every
        // event (issue 18, ST108).
        let doc = &spec(&facts());
        let mut streams = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let Some(content) = op.pointer("/responses/200/content/text~1event-stream") else {
                    continue;
                };
                streams += 1;
                let branches = content["schema"]["oneOf"]
                    .as_array()
                    .unwrap_or_else(|| panic!("{method} {path}: no per-event schema"));
                let names: BTreeSet<&str> = branches
                    .iter()
                    .map(|b| {
                        assert_eq!(b["required"], json!(["event", "data"]), "{path}");
                        assert_eq!(b["properties"]["data"]["type"], "string", "{path}");
                        let payload = b["properties"]["data"]["x-data-schema"]["$ref"]
                            .as_str()
                            .unwrap();
                        assert!(doc.pointer(&payload[1..]).is_some(), "{payload}");
                        let e = b["properties"]["event"]["enum"].as_array().unwrap();
                        assert_eq!(e.len(), 1, "one name per branch: oneOf stays exclusive");
                        e[0].as_str().unwrap()
                    })
                    .collect();
                let want: BTreeSet<&str> = match path.as_str() {
                    "/api/jobs/{id}/events" => JOB_EVENTS.iter().map(|e| e.0).collect(),
                    "/api/models/{name}/pull/events" => PULL_EVENTS.iter().map(|e| e.0).collect(),
                    "/api/memory/stream" => MEMORY_EVENTS.iter().map(|e| e.0).collect(),
                    "/api/events" => SERVER_EVENTS.iter().map(|e| e.0).collect(),
                    other => panic!("unexpected event stream {other}"),
                };
                assert_eq!(names, want, "{path}");
            }
        }
        assert_eq!(streams, 4);
    }

    #[test]
    fn is_structurally_openapi_3() {
        let doc = &spec(&facts());
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.0."));
        assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
        let mut ids = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            assert!(path.starts_with('/'), "{path}");
            for (method, op) in item.as_object().unwrap() {
                let id = op["operationId"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{method} {path}"));
                assert!(ids.insert(id.to_string()), "operationId {id} twice");
                let responses = op["responses"].as_object().unwrap();
                assert!(!responses.is_empty(), "{method} {path}");
                for (code, r) in responses {
                    assert!(
                        code.len() == 3 && code.parse::<u16>().is_ok(),
                        "{method} {path} {code}"
                    );
                    assert!(r["description"].is_string() || r["$ref"].is_string());
                }
                // Every `{param}` in the path is declared as a path parameter.
                let declared: BTreeSet<&str> = op["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| p["in"] == "path")
                    .map(|p| p["name"].as_str().unwrap())
                    .collect();
                let in_path: BTreeSet<&str> = path
                    .split('/')
                    .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
                    .collect();
                assert_eq!(declared, in_path, "{method} {path}");
            }
        }
        let mut all = Vec::new();
        refs(doc, &mut all);
        assert!(!all.is_empty());
        for r in all {
            let pointer = r
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("external ref {r}"));
            assert!(doc.pointer(pointer).is_some(), "unresolved {r}");
        }
    }

    fn properties(name: &str) -> BTreeSet<String> {
        spec(&facts())["components"]["schemas"][name]["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    }

    #[test]
    fn request_schemas_name_the_request_types_fields() {
        let fields =
            |v: Value| -> BTreeSet<String> { v.as_object().unwrap().keys().cloned().collect() };
        let gen = serde_json::to_value(crate::request::GenerationRequest::default()).unwrap();
        assert_eq!(properties("GenerationRequest"), fields(gen));
        assert_eq!(
            properties("EnhanceRequest"),
            BTreeSet::from([
                "prompt".into(),
                "negative_prompt".into(),
                "cfg".into(),
                "steps".into(),
                "exclude".into()
            ])
        );
        // The A1111 and OpenAI request schemas list what the handlers read.
        let a1111: crate::server::a1111::Txt2ImgRequest = serde_json::from_value(json!({
            "prompt": "p", "negative_prompt": "n", "width": 64, "height": 64, "steps": 1,
            "cfg_scale": 1.0, "seed": 1, "batch_size": 1, "n_iter": 1, "alwayson_scripts": {},
        }))
        .unwrap();
        assert_eq!(
            format!("{a1111:?}").matches(": Some(").count(),
            properties("A1111Txt2ImgRequest").len()
        );
        let openai: crate::server::openai::ImagesRequest = serde_json::from_value(json!({
            "prompt": "p", "model": "m", "n": 1, "size": "auto", "response_format": "url",
            "quality": "hd", "style": "vivid", "user": "u", "output_format": "png", "stream": false,
        }))
        .unwrap();
        assert_eq!(
            format!("{openai:?}").matches(": Some(").count() + 1,
            properties("OpenAiImagesRequest").len()
        );
    }
}
