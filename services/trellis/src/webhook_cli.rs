//! `trellis webhook create|list|delete|dead|replay`: the api service's
//! `/v1/integrations` REST calls over HTTP, with this CLI's token, at
//! `--api-url` / `TRELLIS_API_URL` (default `http://127.0.0.1:8080`).
use anyhow::{Context, bail};
use clap::Subcommand;
use serde_json::{Map, Value, json};

#[derive(Debug, Subcommand)]
pub enum WebhookCommand {
    /// A new integration: events whose name starts with --event (of one
    /// device or product if given) are sent to --url. Prints its id and
    /// signing secret (shown only now).
    Create {
        /// Event name prefix ("" for every event).
        #[arg(long)]
        event: String,
        /// Target URL (http or https).
        #[arg(long)]
        url: String,
        /// HTTP method.
        #[arg(long, default_value = "POST")]
        method: String,
        /// Only this device's events.
        #[arg(long)]
        device: Option<String>,
        /// Only events of this product's devices.
        #[arg(long)]
        product: Option<u32>,
        /// A request header, `Name: value` (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
        /// Body template ({{{PARTICLE_EVENT_NAME}}}, {{{PARTICLE_EVENT_VALUE}}},
        /// {{{PARTICLE_DEVICE_ID}}}, {{{PARTICLE_PUBLISHED_AT}}}); default:
        /// {"event","data","published_at","coreid"} as JSON.
        #[arg(long)]
        body: Option<String>,
        /// Deliveries per second at most (0: no limit).
        #[arg(long)]
        rate_limit: Option<f64>,
        /// The HMAC secret (default: a random one).
        #[arg(long)]
        secret: Option<String>,
    },
    /// Your organisation's integrations with delivered, queued, dead and
    /// error counts and the last error.
    List {
        /// Print the JSON the API answers.
        #[arg(long)]
        json: bool,
    },
    /// Deletes an integration with its queue and dead letters.
    Delete { id: String },
    /// An integration's dead letters (one JSON object a line).
    Dead { id: String },
    /// Queues an integration's dead letters again.
    Replay { id: String },
}

impl WebhookCommand {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Create { .. } => "webhook create",
            Self::List { .. } => "webhook list",
            Self::Delete { .. } => "webhook delete",
            Self::Dead { .. } => "webhook dead",
            Self::Replay { .. } => "webhook replay",
        }
    }
}

struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base.trim_end_matches('/'));
        let mut request = self
            .http
            .request(method, &url)
            .bearer_auth(&self.token)
            .header("user-agent", "trellis-cli");
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("the api at {} cannot be reached (--api-url)", self.base))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let value: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if !status.is_success() {
            let message = value
                .get("error_description")
                .or_else(|| value.get("info"))
                .or_else(|| value.get("error"))
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            bail!("{url}: HTTP {status}: {message}");
        }
        Ok(value)
    }
}

pub async fn run(api_url: &str, token: Option<String>, cmd: WebhookCommand) -> anyhow::Result<()> {
    trellis_api::install_tls_provider();
    let token = token.context(
        "no token: set --token / TRELLIS_TOKEN or run `trellis login` (webhooks are per organisation)",
    )?;
    let api = Api {
        http: reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()?,
        base: api_url.to_string(),
        token,
    };
    match cmd {
        WebhookCommand::Create {
            event,
            url,
            method,
            device,
            product,
            headers,
            body,
            rate_limit,
            secret,
        } => {
            let mut h = Map::new();
            for header in headers {
                let (k, v) = header
                    .split_once(':')
                    .with_context(|| format!("--header {header:?}: write it as `Name: value`"))?;
                h.insert(k.trim().to_string(), json!(v.trim()));
            }
            let mut req = json!({
                "integration_type": "Webhook",
                "event": event,
                "url": url,
                "requestType": method,
                "headers": h,
            });
            if let Some(d) = device {
                req["deviceID"] = json!(d);
            }
            if let Some(p) = product {
                req["product_id"] = json!(p);
            }
            if let Some(b) = body {
                req["body"] = json!(b);
            }
            if let Some(r) = rate_limit {
                req["rate_limit"] = json!(r);
            }
            if let Some(s) = secret {
                req["secret"] = json!(s);
            }
            let created = api
                .call(reqwest::Method::POST, "/v1/integrations", Some(req))
                .await?;
            println!("id: {}", created["id"].as_str().unwrap_or_default());
            println!(
                "secret: {} (shown only now: receivers verify X-Trellis-Signature with it)",
                created["secret"].as_str().unwrap_or_default()
            );
        }
        WebhookCommand::List { json } => {
            let list = api
                .call(reqwest::Method::GET, "/v1/integrations", None)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            println!(
                "{:<24}  {:<16}  {:>9}  {:>6}  {:>5}  {:>6}  URL / LAST ERROR",
                "ID", "EVENT", "DELIVERED", "QUEUED", "DEAD", "ERRORS"
            );
            for i in list.as_array().into_iter().flatten() {
                let n = |k: &str| i[k].as_u64().unwrap_or(0);
                println!(
                    "{:<24}  {:<16}  {:>9}  {:>6}  {:>5}  {:>6}  {}",
                    i["id"].as_str().unwrap_or_default(),
                    i["event"].as_str().unwrap_or_default(),
                    n("delivered"),
                    n("queued"),
                    n("dead"),
                    n("errors"),
                    i["url"].as_str().unwrap_or_default(),
                );
                if let Some(e) = i["last_error"].as_str() {
                    println!(
                        "{:<24}  last error {}: {e}",
                        "",
                        i["last_error_at"].as_str().unwrap_or_default()
                    );
                }
            }
        }
        WebhookCommand::Delete { id } => {
            api.call(
                reqwest::Method::DELETE,
                &format!("/v1/integrations/{id}"),
                None,
            )
            .await?;
            println!("deleted {id}");
        }
        WebhookCommand::Dead { id } => {
            let letters = api
                .call(
                    reqwest::Method::GET,
                    &format!("/v1/integrations/{id}/dead"),
                    None,
                )
                .await?;
            for l in letters.as_array().into_iter().flatten() {
                println!("{l}");
            }
        }
        WebhookCommand::Replay { id } => {
            let r = api
                .call(
                    reqwest::Method::POST,
                    &format!("/v1/integrations/{id}/replay"),
                    None,
                )
                .await?;
            println!("replayed {}", r["replayed"].as_i64().unwrap_or(0));
        }
    }
    Ok(())
}
