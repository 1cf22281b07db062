//! `wasi:logging@0.1.0-draft` (wasmCloud's): a guest's log lines go to the node's log with
//! its tenant and component, its level mapped to the node's (`critical` is logged as an
//! error with `critical=true`) and its context as a field. Like stdout, a message is cut
//! at 8 KiB so that a guest cannot flood the log with one line.

use std::sync::Arc;

use wasmtime::component::{HasData, Linker};

use crate::bindings::compat::wasi::logging::logging::{self, Level};

/// Longest message logged whole.
const MAX_MESSAGE: usize = 8 * 1024;

/// The view a store gives the logging host function: whose log lines they are.
pub struct Logging<'a> {
    pub tenant: &'a Arc<str>,
    pub component: &'a Arc<str>,
}

struct HasLogging;

impl HasData for HasLogging {
    type Data<'a> = Logging<'a>;
}

pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> Logging<'_>,
) -> wasmtime::Result<()> {
    logging::add_to_linker::<T, HasLogging>(linker, view)
}

fn clip(text: &str) -> &str {
    if text.len() <= MAX_MESSAGE {
        return text;
    }
    let mut end = MAX_MESSAGE;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

impl logging::Host for Logging<'_> {
    async fn log(
        &mut self,
        level: Level,
        context: String,
        message: String,
    ) -> wasmtime::Result<()> {
        let (tenant, component) = (&**self.tenant, &**self.component);
        // One call is one log line: a newline may not start a line that looks like
        // another's.
        let (context, message) = (
            clip(&context).replace('\n', "\\n"),
            clip(&message).replace('\n', "\\n"),
        );
        macro_rules! guest_log {
            ($level:ident $(, $extra:ident = $value:expr)?) => {
                tracing::$level!(target: "trellis::guest", tenant = %tenant, component = %component, context = %context $(, $extra = $value)?, "{message}")
            };
        }
        match level {
            Level::Trace => guest_log!(trace),
            Level::Debug => guest_log!(debug),
            Level::Info => guest_log!(info),
            Level::Warn => guest_log!(warn),
            Level::Error => guest_log!(error),
            Level::Critical => guest_log!(error, critical = true),
        }
        Ok(())
    }
}
