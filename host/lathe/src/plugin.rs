//! `lathe plugin new | build | inspect | test | list`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use lathe_sandbox::{Plugin, Runtime};
use serde_json::Value;

#[derive(Subcommand)]
pub enum PluginCommand {
    /// Make a ready-to-build plugin: a Rust crate, or a Python module (`--lang python`).
    New(NewArgs),
    /// Build a plugin into a component (cargo, or componentize-py for a folder with app.py)
    /// and check it loads.
    Build {
        /// The plugin's folder.
        path: PathBuf,
    },
    /// Show a plugin's world, version, configuration schema and size.
    Inspect {
        /// A .wasm component, or `builtin:NAME`.
        plugin: String,
    },
    /// Run a plugin on sample input and print what it returns (JSON).
    Test(TestArgs),
    /// List the built-in plugins.
    List,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum KindArg {
    Scorer,
    Validator,
    Formatter,
    Judge,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LangArg {
    Rust,
    /// A module built into a component by componentize-py (`pip install componentize-py`).
    Python,
}

#[derive(Args)]
pub struct NewArgs {
    #[arg(long, value_enum)]
    kind: KindArg,
    #[arg(long, value_enum, default_value = "rust")]
    lang: LangArg,
    /// The crate's name (and folder).
    name: String,
    /// Depend on the SDK crate at this path (for work on the SDK itself). By default the
    /// crate gets its own copy of the SDK this binary carries, in `lathe-plugin-sdk/`, so
    /// it builds wherever it lives.
    #[arg(long)]
    sdk: Option<PathBuf>,
}

#[derive(Args)]
pub struct TestArgs {
    /// A .wasm component, or `builtin:NAME`.
    plugin: String,
    /// JSON input. Scorer: {"prediction", "reference"} (or a list of them); validator: the
    /// output as a JSON string or {"output"}; formatter: the raw record; judge:
    /// {"input", "output", "reference"?} for the prompt or {"answer"} for the verdict.
    #[arg(long)]
    input: String,
    /// The plugin's configuration (JSON).
    #[arg(long, default_value = "{}")]
    config: String,
}

pub fn run(cmd: PluginCommand) -> Result<()> {
    match cmd {
        PluginCommand::New(a) => new(a),
        PluginCommand::Build { path } => build(&path),
        PluginCommand::Inspect { plugin } => {
            let p = load(&plugin)?;
            println!("{}", serde_json::to_string_pretty(&lathe_jobs::plugins::describe(p.info()))?);
            Ok(())
        }
        PluginCommand::Test(a) => test(a),
        PluginCommand::List => {
            let rt = runtime()?;
            for (name, bytes) in lathe_sandbox::BUILTIN_PLUGINS {
                let p = rt.load(bytes).with_context(|| format!("built-in {name}"))?;
                println!("{:<18} {:<10} {}", name, p.kind(), p.info().description);
            }
            Ok(())
        }
    }
}

/// The CLI's runtime: each world's limits from `LATHE_PLUGIN_<WORLD>_*`, compiled plugins
/// cached under `$XDG_CACHE_HOME/lathe/plugins` (or `~/.cache/lathe/plugins`), so only the
/// first run of a plugin compiles it.
pub fn runtime() -> Result<Runtime> {
    Ok(Runtime::new(lathe_jobs::env::runtime_config(lathe_jobs::env::default_plugin_cache())?)?)
}

fn load(spec: &str) -> Result<Plugin> {
    let rt = runtime()?;
    let bytes = match spec.strip_prefix("builtin:") {
        Some(name) => lathe_sandbox::builtin(name)
            .with_context(|| format!("no built-in plugin `{name}` (see `lathe plugin list`)"))?
            .to_vec(),
        None => std::fs::read(spec).with_context(|| format!("reading {spec}"))?,
    };
    rt.load(&bytes).with_context(|| format!("{spec} is not a usable plugin"))
}

fn test(a: TestArgs) -> Result<()> {
    let plugin = load(&a.plugin)?;
    let input: Value = serde_json::from_str(&a.input).context("--input is not valid JSON")?;
    let out = lathe_jobs::plugins::try_on(&plugin, &a.config, &input)?;
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// The world a kind of plugin implements.
fn world(kind: KindArg) -> &'static str {
    match kind {
        KindArg::Scorer => "scorer",
        KindArg::Validator => "validator",
        KindArg::Formatter => "formatter",
        KindArg::Judge => "judge",
    }
}

/// A Python plugin: `app.py` from the SDK's template, the WIT it is built against, and
/// `plugin.toml` naming its world for `lathe plugin build`.
fn new_python(a: &NewArgs, dir: &Path) -> Result<()> {
    let sdk = lathe_sandbox::sdk::latest();
    let world = world(a.kind);
    let app = sdk.python_template(world, &a.name).with_context(|| format!("no Python template for {world}"))?;
    std::fs::create_dir_all(dir.join("wit"))?;
    std::fs::write(dir.join("app.py"), app)?;
    std::fs::write(dir.join("wit/plugin.wit"), sdk.wit_text())?;
    std::fs::write(
        dir.join("plugin.toml"),
        format!(
            "# Built by `lathe plugin build` with componentize-py against wit/ (lathe:plugin@{}).\n\
             language = \"python\"\nworld = \"{world}\"\n",
            sdk.wit_version
        ),
    )?;
    println!(
        "created {} ({world} plugin in Python, lathe:plugin@{}); build it with `lathe plugin build {}`",
        dir.display(),
        sdk.wit_version,
        dir.display()
    );
    Ok(())
}

/// componentize-py: `$LATHE_COMPONENTIZE_PY`, else the one on the PATH.
fn componentize_py() -> PathBuf {
    std::env::var_os("LATHE_COMPONENTIZE_PY").map_or_else(|| "componentize-py".into(), PathBuf::from)
}

/// Builds a Python plugin into `<dir>/build/<name>.wasm`.
fn build_python(path: &Path) -> Result<PathBuf> {
    let toml = std::fs::read_to_string(path.join("plugin.toml"))
        .with_context(|| format!("{} has app.py but no plugin.toml naming its world", path.display()))?;
    let world = toml
        .lines()
        .find_map(|l| l.trim().strip_prefix("world").map(|r| r.trim_start_matches([' ', '=']).trim().trim_matches('"').to_string()))
        .with_context(|| format!("{}: no `world = ...` line", path.join("plugin.toml").display()))?;
    let name = path.canonicalize()?.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "plugin".into());
    std::fs::create_dir_all(path.join("build"))?;
    let wasm = path.join("build").join(format!("{name}.wasm"));
    let tool = componentize_py();
    let status = Command::new(&tool)
        .args(["-d", "wit", "-w", &world, "componentize", "app", "-o"])
        .arg(wasm.strip_prefix(path).expect("under the plugin's folder"))
        .current_dir(path)
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| {
            format!("running {} (pip install componentize-py==0.25.1, or set LATHE_COMPONENTIZE_PY)", tool.display())
        })?;
    if !status.success() {
        bail!("componentize-py failed for {}", path.display());
    }
    Ok(wasm)
}

fn build(path: &Path) -> Result<()> {
    let wasm = if path.join("app.py").exists() { build_python(path)? } else { build_rust(path)? };
    let p = load(wasm.to_str().context("non-UTF-8 path")?)?;
    println!("{}", wasm.display());
    println!("{}", serde_json::to_string_pretty(&lathe_jobs::plugins::describe(p.info()))?);
    Ok(())
}

fn build_rust(path: &Path) -> Result<PathBuf> {
    let manifest = path.join("Cargo.toml");
    if !manifest.exists() {
        bail!("{} is not a crate (no Cargo.toml)", path.display());
    }
    // Ask cargo where the component lands (CARGO_TARGET_DIR or a workspace may move it).
    let out = Command::new("cargo")
        .args(["build", "--release", "--target", "wasm32-wasip2", "--message-format", "json-render-diagnostics", "--manifest-path"])
        .arg(&manifest)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo")?;
    if !out.status.success() {
        bail!("cargo build failed for {}", path.display());
    }
    let wasm = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .flat_map(|m| m["filenames"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| f.as_str().map(PathBuf::from))
        .rfind(|f| f.extension().is_some_and(|e| e == "wasm"))
        .with_context(|| format!("cargo built no .wasm for {} (is it a cdylib?)", path.display()))?;
    Ok(wasm)
}

fn new(a: NewArgs) -> Result<()> {
    let dir = PathBuf::from(&a.name);
    if dir.exists() {
        bail!("{} already exists", dir.display());
    }
    if let LangArg::Python = a.lang {
        return new_python(&a, &dir);
    }
    let ident: String = a
        .name
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w[..1].to_uppercase() + &w[1..])
        .collect();
    let ident = if ident.is_empty() || ident.starts_with(|c: char| c.is_ascii_digit()) { format!("P{ident}") } else { ident };
    let body = match a.kind {
        KindArg::Scorer => format!(
            r#"use lathe_plugin_sdk::{{PluginInfo, Score, Scorer, Value}};

struct {ident};

impl Scorer for {ident} {{
    fn info() -> PluginInfo {{
        PluginInfo::new("{name}", env!("CARGO_PKG_VERSION"), "1 when the prediction contains the reference")
    }}

    fn new(_config: &Value) -> Result<Self, String> {{
        Ok({ident})
    }}

    fn score(&self, prediction: &str, reference: &str) -> Score {{
        Score::of(if prediction.contains(reference.trim()) {{ 1.0 }} else {{ 0.0 }})
    }}
}}

lathe_plugin_sdk::export_scorer!({ident});
"#,
            name = a.name
        ),
        KindArg::Validator => format!(
            r#"use lathe_plugin_sdk::{{PluginInfo, Validator, Value, Violation}};

struct {ident};

impl Validator for {ident} {{
    fn info() -> PluginInfo {{
        PluginInfo::new("{name}", env!("CARGO_PKG_VERSION"), "The output must not be empty")
    }}

    fn new(_config: &Value) -> Result<Self, String> {{
        Ok({ident})
    }}

    fn validate(&self, output: &str) -> Result<(), Vec<Violation>> {{
        if output.trim().is_empty() {{
            return Err(vec![Violation {{ path: String::new(), message: "empty output".into() }}]);
        }}
        Ok(())
    }}
}}

lathe_plugin_sdk::export_validator!({ident});
"#,
            name = a.name
        ),
        KindArg::Formatter => format!(
            r#"use lathe_plugin_sdk::{{Example, FieldError, Formatter, Message, PluginInfo, Value}};

struct {ident};

impl Formatter for {ident} {{
    fn info() -> PluginInfo {{
        PluginInfo::new("{name}", env!("CARGO_PKG_VERSION"), "question/answer records to chats")
    }}

    fn new(_config: &Value) -> Result<Self, String> {{
        Ok({ident})
    }}

    fn format(&self, record: &Value) -> Result<Example, FieldError> {{
        let field = |k: &str| record.get(k).and_then(Value::as_str).ok_or_else(|| FieldError::new(k, "missing or not a string"));
        Ok(Example::Chat(vec![Message::new("user", field("question")?), Message::new("assistant", field("answer")?)]))
    }}
}}

lathe_plugin_sdk::export_formatter!({ident});
"#,
            name = a.name
        ),
        KindArg::Judge => format!(
            r#"use lathe_plugin_sdk::{{Judge, Judgment, Message, PluginInfo, Value}};

struct {ident};

impl Judge for {ident} {{
    fn info() -> PluginInfo {{
        PluginInfo::new("{name}", env!("CARGO_PKG_VERSION"), "Asks the judge for a yes/no verdict")
    }}

    fn new(_config: &Value) -> Result<Self, String> {{
        Ok({ident})
    }}

    fn build_prompt(&self, input: &str, output: &str, _reference: Option<&str>) -> Vec<Message> {{
        vec![Message::new("user", format!("Task: {{input}}\nAnswer: {{output}}\nIs the answer correct? Reply yes or no."))]
    }}

    fn parse_verdict(&self, answer: &str) -> Result<Judgment, String> {{
        let a = answer.trim().to_lowercase();
        if a.starts_with("yes") {{
            Ok(Judgment {{ score: 1.0, reason: answer.into() }})
        }} else if a.starts_with("no") {{
            Ok(Judgment {{ score: 0.0, reason: answer.into() }})
        }} else {{
            Err(format!("expected yes or no, got {{answer:?}}"))
        }}
    }}
}}

lathe_plugin_sdk::export_judge!({ident});
"#,
            name = a.name
        ),
    };
    std::fs::create_dir_all(dir.join("src"))?;
    let sdk = match a.sdk {
        Some(p) => p.canonicalize().with_context(|| format!("the SDK is not at {}", p.display()))?.display().to_string(),
        None => {
            let sdk = lathe_sandbox::sdk::latest();
            sdk.write_to(&dir.join("lathe-plugin-sdk"))
                .with_context(|| format!("writing the SDK into {}", dir.display()))?;
            "lathe-plugin-sdk".to_string()
        }
    };
    std::fs::write(
        dir.join("Cargo.toml"),
        format!(
            "[package]\nname = \"{}\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n\
             [dependencies]\nlathe-plugin-sdk = {{ path = {:?} }}\n\n[profile.release]\nopt-level = \"s\"\nlto = true\nstrip = true\n\n\
             # A workspace of its own: it builds for wasm32-wasip2 wherever it lives.\n[workspace]\n",
            a.name, sdk
        ),
    )?;
    std::fs::write(dir.join("src/lib.rs"), body)?;
    println!(
        "created {} ({} plugin, lathe:plugin@{}); build it with `lathe plugin build {}`",
        dir.display(),
        world(a.kind),
        lathe_sandbox::sdk::latest().wit_version,
        dir.display()
    );
    Ok(())
}
